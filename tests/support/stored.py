"""What a request left in a Redis (a real one or fakeredis): its events stream, what was
published on its channel, its reply, the dead letters; and everything requests left, for the
secret scans."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import redis

from tasks.contract import keys
from tasks.contract.schemas import ChatReply, StreamEvent


def parse_events(entries: Any) -> list[StreamEvent]:
    """The events of XRANGE entries of a ``cascade:events:{id}`` stream, in their order."""
    return [StreamEvent.model_validate_json(fields[keys.EVENT_FIELD.encode()]) for _id, fields in entries]


def stored_events(client: redis.Redis, request_id: str) -> list[StreamEvent]:
    """The events now in ``cascade:events:{id}`` (XRANGE), in order."""
    return parse_events(client.xrange(keys.events_stream(request_id)))


def published_events(pubsub: Any, *, until_terminal_s: float | None = None, poll_s: float = 0.01) -> list[StreamEvent]:
    """The events published on the channels ``pubsub`` listens to (``cascade:stream:{id}``).

    Without ``until_terminal_s``: those already there (reading until none came for ``poll_s``).
    With it: reading on until a terminal event, for at most that long (``TimeoutError``).
    """
    events: list[StreamEvent] = []
    give_up = None if until_terminal_s is None else time.monotonic() + until_terminal_s
    while True:
        if give_up is not None:
            if events and events[-1].is_terminal:
                return events
            if time.monotonic() >= give_up:
                got = [e.type for e in events]
                raise TimeoutError(f"no terminal event on the channel within {until_terminal_s} s; got {got}")
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=poll_s)
        if message is None and give_up is None:
            return events
        if message is not None and message["type"] == "message":
            events.append(StreamEvent.model_validate_json(message["data"]))


def stored_reply(client: redis.Redis, request_id: str) -> ChatReply | None:
    """The reply stored at ``cascade:reply:{id}``, if any."""
    raw = client.get(keys.reply_key(request_id))
    return ChatReply.model_validate_json(raw) if raw else None


def dead_letters(client: redis.Redis) -> list[dict[str, Any]]:
    """Every entry of ``cascade:dead``, newest first."""
    return [json.loads(raw) for raw in client.lrange(keys.DEAD_LETTERS, 0, -1)]


def everything_produced(client: redis.Redis, logs: Iterable[Path] = ()) -> str:
    """Every worker log and everything in Redis a request can leave behind: events, replies,
    dead letters, cooldowns, leases, in-flight records, Celery results and queued messages."""
    produced = [path.read_text(errors="replace") for path in logs if path.exists()]
    for pattern in ("cascade:*", "celery-task-meta-*", "chat*", "_kombu*", "unacked*"):
        for key in client.scan_iter(match=pattern, count=1000):
            kind = client.type(key)
            if kind == b"string":
                produced.append(client.get(key).decode(errors="replace"))
            elif kind == b"stream":
                for _id, fields in client.xrange(key):
                    produced.extend(value.decode(errors="replace") for value in fields.values())
            elif kind == b"list":
                produced.extend(item.decode(errors="replace") for item in client.lrange(key, 0, -1))
            elif kind == b"hash":
                produced.extend(value.decode(errors="replace") for value in client.hvals(key))
            elif kind == b"zset":
                produced.extend(member.decode(errors="replace") for member in client.zrange(key, 0, -1))
    return "\n".join(produced)
