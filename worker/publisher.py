"""Publishing a request's events: pub/sub for live subscribers, a Redis Stream for replay.

Each event costs one round trip: PUBLISH, XADD (bounded with MAXLEN), EXPIRE and an EXISTS on
the cancel key travel in one pipeline, so checking for a cancel is free. The terminal event
and the stored reply are written in one MULTI/EXEC, reply first, so a subscriber that sees
``done`` can always read the reply.
"""

from __future__ import annotations

import time
from typing import Any, cast

import redis

from tasks import keys
from tasks.schemas import TERMINAL_EVENT_TYPES, ChatReply, StreamEvent
from worker.store import ReplyStore


class StreamClosed(RuntimeError):
    """An event was emitted after the request's terminal event."""


class EventPublisher:
    """Emits the events of one request with ``seq`` strictly increasing and one terminal event."""

    def __init__(
        self,
        client: redis.Redis,
        request_id: str,
        *,
        store: ReplyStore,
        events_maxlen: int,
        events_ttl_s: int,
        next_seq: int = 0,
    ) -> None:
        self._client = client
        self.request_id = request_id
        self._store = store
        self._maxlen = events_maxlen
        self._ttl_s = events_ttl_s
        self.next_seq = next_seq
        self.closed = False
        self._channel = keys.stream_channel(request_id)
        self._stream = keys.events_stream(request_id)
        self._cancel = keys.cancel_key(request_id)

    @staticmethod
    def resume_seq(client: redis.Redis, request_id: str) -> int:
        """The ``seq`` to continue from when a request's events stream already has entries
        (a redelivered or handed-off request); 0 for a new request."""
        last = client.xrevrange(keys.events_stream(request_id), count=1)
        if not last:
            return 0
        _entry_id, fields = last[0]
        event = StreamEvent.model_validate_json(cast(dict[bytes, bytes], fields)[keys.EVENT_FIELD.encode()])
        return event.seq + 1

    def emit(self, event_type: str, **fields: Any) -> bool:
        """Publish a non-terminal event; return True if the request has been cancelled."""
        if event_type in TERMINAL_EVENT_TYPES:
            raise ValueError(f"use finish() for the terminal event {event_type!r}")
        pipe = self._client.pipeline(transaction=False)
        self._stage(pipe, event_type, fields)
        pipe.exists(self._cancel)
        return bool(pipe.execute()[-1])

    def cancel_requested(self) -> bool:
        """True if a producer set the cancel key (one round trip)."""
        return bool(self._client.exists(self._cancel))

    def finish(self, event_type: str, reply: ChatReply, **fields: Any) -> None:
        """Store ``reply`` and publish the terminal event, atomically."""
        if event_type not in TERMINAL_EVENT_TYPES:
            raise ValueError(f"{event_type!r} is not a terminal event")
        pipe = self._client.pipeline(transaction=True)
        self._store.stage(pipe, reply)
        self._stage(pipe, event_type, {**fields, "reply": reply})
        pipe.execute()
        self.closed = True

    def _stage(self, pipe: Any, event_type: str, fields: dict[str, Any]) -> None:
        if self.closed:
            raise StreamClosed(f"request {self.request_id} already ended")
        event = StreamEvent(
            type=event_type,  # type: ignore[arg-type]
            request_id=self.request_id,
            seq=self.next_seq,
            ts=round(time.time(), 6),
            **fields,
        )
        payload = event.model_dump_json(exclude_none=True)
        pipe.publish(self._channel, payload)
        pipe.xadd(self._stream, {keys.EVENT_FIELD: payload}, maxlen=self._maxlen, approximate=True)
        pipe.expire(self._stream, self._ttl_s)
        self.next_seq += 1
