"""Where outcomes are kept: the reply store and the dead-letter list."""

from __future__ import annotations

import json
import time
from typing import Any

import redis
from pydantic import TypeAdapter

from tasks.contract import keys
from tasks.contract.images import ImageReply
from tasks.contract.schemas import AnyReply, ChatReply

# How much of an unprocessable message is kept in its dead letter.
DEAD_BODY_PREVIEW_CHARS = 2_000
# The other fields come from the message too (a task id header can be any length): bounded.
DEAD_ID_CHARS = 256
DEAD_MESSAGE_CHARS = 1_000


_ANY_REPLY: TypeAdapter[ChatReply | ImageReply] = TypeAdapter(AnyReply)


class ReplyStore:
    """Final replies at ``cascade:reply:{request_id}``, JSON with a TTL."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self._client = client
        self.ttl_s = ttl_s

    def get(self, request_id: str) -> ChatReply | ImageReply | None:
        """The stored reply of ``request_id``, if any (an ``ImageReply`` for ``cascade.image``)."""
        raw = self._client.get(keys.reply_key(request_id))
        return _ANY_REPLY.validate_json(raw) if raw else None


class DeadLetters:
    """``cascade:dead``: messages that could not be processed, newest first, bounded."""

    def __init__(self, client: redis.Redis, maxlen: int, ttl_s: int) -> None:
        self._client = client
        self._maxlen = maxlen
        self._ttl_s = ttl_s

    def push(
        self,
        reason: str,
        message: str,
        *,
        body: Any = None,
        request_id: str | None = None,
        task_id: str | None = None,
        queue: str | None = None,
    ) -> None:
        """Record one unprocessable message with the ``reason`` (a taxonomy code) and why."""
        entry = {
            "reason": reason,
            "message": message[:DEAD_MESSAGE_CHARS],
            "request_id": _bounded(request_id),
            "task_id": _bounded(task_id),
            "queue": _bounded(queue),
            "at": round(time.time(), 3),
            "body": _preview(body),
        }
        pipe = self._client.pipeline(transaction=False)
        pipe.lpush(keys.DEAD_LETTERS, json.dumps(entry))
        pipe.ltrim(keys.DEAD_LETTERS, 0, self._maxlen - 1)
        pipe.expire(keys.DEAD_LETTERS, self._ttl_s)
        pipe.execute()


def _bounded(value: str | None) -> str | None:
    return value[:DEAD_ID_CHARS] if isinstance(value, str) else None


def _preview(body: Any) -> str | None:
    if body is None:
        return None
    if isinstance(body, bytes):
        text = body[: DEAD_BODY_PREVIEW_CHARS * 4].decode("utf-8", errors="replace")
    elif isinstance(body, str):
        text = body
    else:
        try:
            text = json.dumps(body, default=repr)
        except (TypeError, ValueError):
            text = repr(body)
    return text[:DEAD_BODY_PREVIEW_CHARS]
