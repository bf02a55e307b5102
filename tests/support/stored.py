"""What a request left in a real Redis: its events stream, its reply, the dead letters (read by
the integration and fault harnesses)."""

from __future__ import annotations

import json
from typing import Any

import redis

from tasks.contract import keys
from tasks.contract.schemas import ChatReply, StreamEvent


def stored_events(client: redis.Redis, request_id: str) -> list[StreamEvent]:
    """The events now in ``cascade:events:{id}`` (XRANGE), in order."""
    entries = client.xrange(keys.events_stream(request_id))
    return [StreamEvent.model_validate_json(fields[keys.EVENT_FIELD.encode()]) for _id, fields in entries]


def stored_reply(client: redis.Redis, request_id: str) -> ChatReply | None:
    """The reply stored at ``cascade:reply:{id}``, if any."""
    raw = client.get(keys.reply_key(request_id))
    return ChatReply.model_validate_json(raw) if raw else None


def dead_letters(client: redis.Redis) -> list[dict[str, Any]]:
    """Every entry of ``cascade:dead``, newest first."""
    return [json.loads(raw) for raw in client.lrange(keys.DEAD_LETTERS, 0, -1)]
