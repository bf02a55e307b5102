"""Publishing a request's events: pub/sub for live subscribers, a Redis Stream for replay.

Each event costs one round trip: PUBLISH, XADD (bounded with MAXLEN), EXPIRE, an EXISTS on
the cancel key and, for a leased request, a GET of the lease travel in one pipeline, so
checking for a cancel or a lost lease is free. The terminal event and the stored reply are
written by one Lua script, reply first, and only if no reply is stored yet and the lease is
still ours: a request gets exactly one reply and one terminal event, however many workers
ran it.
"""

from __future__ import annotations

import time
from typing import Any, cast

import redis

from tasks import keys
from tasks.schemas import TERMINAL_EVENT_TYPES, ChatReply, StreamEvent
from worker.lease import LeaseLost, RequestLease
from worker.store import ReplyStore


class StreamClosed(RuntimeError):
    """An event was emitted after the request's terminal event."""


# KEYS: reply, channel, events stream, lease (or "")
# ARGV: reply JSON, reply TTL, event JSON, maxlen, events TTL, lease token (or "")
_FINISH = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if ARGV[6] ~= '' and redis.call('GET', KEYS[4]) ~= ARGV[6] then return -1 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('PUBLISH', KEYS[2], ARGV[3])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'event', ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[5])
return 1
"""


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
        lease: RequestLease | None = None,
    ) -> None:
        self._client = client
        self.request_id = request_id
        self._store = store
        self._maxlen = events_maxlen
        self._ttl_s = events_ttl_s
        self.next_seq = next_seq
        self.closed = False
        self._lease = lease
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
        if self._lease is not None:
            pipe.get(self._lease.key)
            *_, cancelled, holder = pipe.execute()
            if not self._lease.holds(holder):
                raise LeaseLost(f"request {self.request_id} is now run by another worker")
            return bool(cancelled)
        return bool(pipe.execute()[-1])

    def cancel_requested(self) -> bool:
        """True if a producer set the cancel key (one round trip)."""
        return bool(self._client.exists(self._cancel))

    def finish(self, event_type: str, reply: ChatReply, **fields: Any) -> bool:
        """Store ``reply`` and publish the terminal event, atomically; False (and nothing
        written) if the request already has a reply. Raises ``LeaseLost`` if another worker
        took the request over."""
        if event_type not in TERMINAL_EVENT_TYPES:
            raise ValueError(f"{event_type!r} is not a terminal event")
        if self.closed:
            raise StreamClosed(f"request {self.request_id} already ended")
        payload = self._event(event_type, {**fields, "reply": reply})
        written = self._client.eval(
            _FINISH,
            4,
            keys.reply_key(self.request_id),
            self._channel,
            self._stream,
            self._lease.key if self._lease else "",
            reply.model_dump_json(),
            self._store.ttl_s,
            payload,
            self._maxlen,
            self._ttl_s,
            self._lease.token if self._lease else "",
        )
        if written == -1:
            raise LeaseLost(f"request {self.request_id} is now run by another worker")
        self.closed = True
        if written == 1:
            self.next_seq += 1
        return bool(written == 1)

    def _event(self, event_type: str, fields: dict[str, Any]) -> str:
        event = StreamEvent(
            type=event_type,  # type: ignore[arg-type]
            request_id=self.request_id,
            seq=self.next_seq,
            ts=round(time.time(), 6),
            **fields,
        )
        return event.model_dump_json(exclude_none=True)

    def _stage(self, pipe: Any, event_type: str, fields: dict[str, Any]) -> None:
        if self.closed:
            raise StreamClosed(f"request {self.request_id} already ended")
        payload = self._event(event_type, fields)
        pipe.publish(self._channel, payload)
        pipe.xadd(self._stream, {keys.EVENT_FIELD: payload}, maxlen=self._maxlen, approximate=True)
        pipe.expire(self._stream, self._ttl_s)
        self.next_seq += 1
