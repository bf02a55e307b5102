"""Publishing a request's events: pub/sub for live subscribers, a Redis Stream for replay.

Each event costs one round trip: PUBLISH, XADD (bounded with MAXLEN) and a read of the cancel
key and, for a leased request, of the lease (one MGET) travel in one pipeline, so checking for
a cancel or a lost lease is free; the first event sets the stream's TTL (EXPIRE), which a
stream longer than a quarter of the TTL renews. The terminal event and the stored reply are
written by one Lua script, reply first, and only if no reply is stored yet and the lease is
still ours: a request gets exactly one reply and one terminal event, however many workers
ran it. The same script publishes a coalesced chunk still waiting, releases the lease and
ends the request's pending record (``worker.pending``): one round trip ends a request.

Coalescing (``coalesce_s`` > 0, ``CASCADE_COALESCE_MS``, 2 ms by default): a chunk that comes
less than ``coalesce_s`` after the last publish waits, and the chunks that follow it within the
window join its ``delta``; a background flusher publishes them at the window's end, and any
other event (``fallback``, the terminal event) publishes them first. A chunk after a quiet
window (the first one, say) still goes out at once, so the first token is not delayed, and a
fast stream costs one round trip per window instead of one per chunk. ``seq`` stays strictly
increasing, a cancel seen by a background flush is reported by the next ``emit``, and a
failure there (a lost lease, Redis gone) is raised by the next call.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, cast

import redis

from tasks import keys
from tasks.schemas import TERMINAL_EVENT_TYPES, ChatReply, StreamEvent
from worker import pending as pending_set
from worker.lease import LeaseLost, RequestLease
from worker.store import ReplyStore


class StreamClosed(RuntimeError):
    """An event was emitted after the request's terminal event."""


# KEYS: reply, channel, events stream, lease (or ""), pending set, pending record, in-flight
#       record, in-flight set
# ARGV: reply JSON, reply TTL, terminal event JSON, maxlen, events TTL, lease token (or ""),
#       request id, a coalesced chunk event to publish first (or "")
_FINISH = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if ARGV[6] ~= '' and redis.call('GET', KEYS[4]) ~= ARGV[6] then return -1 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('ZREM', KEYS[5], ARGV[7])
redis.call('DEL', KEYS[6])
if ARGV[8] ~= '' then
    redis.call('PUBLISH', KEYS[2], ARGV[8])
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'event', ARGV[8])
end
redis.call('PUBLISH', KEYS[2], ARGV[3])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'event', ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[5])
if ARGV[6] ~= '' then
    redis.call('DEL', KEYS[4], KEYS[7])
    redis.call('ZREM', KEYS[8], ARGV[7])
end
return 1
"""


@dataclass
class _PendingChunk:
    """Chunk deltas of one attempt waiting for their window to end."""

    fields: dict[str, Any]
    due: float
    deltas: list[str] = field(default_factory=list)

    def merged(self) -> dict[str, Any]:
        return {**self.fields, "delta": "".join(self.deltas)}

    def same_attempt(self, fields: dict[str, Any]) -> bool:
        return all(self.fields.get(name) == fields.get(name) for name in ("provider", "attempt"))


class _Flusher:
    """One daemon thread per process publishes the waiting chunks of every request whose
    window ended, so coalescing starts no thread per request."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        """A fresh state: at import, and in a forked child (the parent's thread is not there)."""
        self._cond = threading.Condition()
        self._due: dict[EventPublisher, float] = {}
        self._thread: threading.Thread | None = None

    def schedule(self, publisher: EventPublisher, due: float) -> None:
        """Have ``publisher`` flushed at ``due`` (``time.monotonic()``)."""
        with self._cond:
            wake = not self._due or due < min(self._due.values())  # else the thread wakes in time
            self._due[publisher] = min(due, self._due.get(publisher, due))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="cascade-coalesce", daemon=True)
                self._thread.start()
            elif wake:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                ready = [publisher for publisher, due in self._due.items() if due <= now]
                for publisher in ready:
                    del self._due[publisher]
                if not ready:
                    next_due = min(self._due.values(), default=None)
                    self._cond.wait(None if next_due is None else next_due - now)
                    continue
            for publisher in ready:  # outside our lock: each takes its publisher's lock
                publisher._flush_due()


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
        coalesce_s: float = 0.0,
        stream_ttl_set: bool = False,
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
        self._coalesce_s = coalesce_s
        self._lock = threading.RLock()
        self._pending: _PendingChunk | None = None
        self._last_sent = -float("inf")
        self._cancelled = False
        self._failure: BaseException | None = None
        # The first event sets the stream's TTL, unless it was published already with its TTL
        # (the ``start`` event of ``worker.opening``).
        self._refresh_ttl_at = time.monotonic() + events_ttl_s / 4 if stream_ttl_set else -float("inf")

    @staticmethod
    def resume_seq(client: redis.Redis, request_id: str) -> int:
        """The ``seq`` to continue from when a request's events stream already has entries
        (a redelivered or handed-off request); 0 for a new request."""
        return EventPublisher.seq_after(client.xrevrange(keys.events_stream(request_id), count=1))

    @staticmethod
    def seq_after(last: Any) -> int:
        """The ``seq`` that follows the last entry of an events stream (``XREVRANGE ... COUNT 1``);
        0 when there is none."""
        if not last:
            return 0
        _entry_id, fields = last[0]
        event = StreamEvent.model_validate_json(cast(dict[bytes, bytes], fields)[keys.EVENT_FIELD.encode()])
        return event.seq + 1

    def emit(self, event_type: str, **fields: Any) -> bool:
        """Publish a non-terminal event; return True if the request has been cancelled.

        With coalescing on, a ``chunk`` may wait up to ``coalesce_s`` to be published with the
        chunks that follow it; any other event publishes a waiting chunk first.
        """
        if event_type in TERMINAL_EVENT_TYPES:
            raise ValueError(f"use finish() for the terminal event {event_type!r}")
        with self._lock:
            self._raise_failure()
            if self.closed:
                raise StreamClosed(f"request {self.request_id} already ended")
            if event_type == "chunk" and self._coalesce_s > 0:
                return self._gather(fields)
            return self._send((event_type, fields))

    def flush(self) -> bool:
        """Publish a waiting chunk now, if there is one; return True if the request has been
        cancelled."""
        with self._lock:
            self._raise_failure()
            return self._send(None) if self._pending is not None else self._cancelled

    def _gather(self, fields: dict[str, Any]) -> bool:
        """Coalescing: publish the chunk now after a quiet window, else let it wait (lock held)."""
        pending = self._pending
        if pending is not None and not pending.same_attempt(fields):
            self._send(None)  # never merge text of two attempts
            pending = None
        now = time.monotonic()
        if pending is None and now - self._last_sent >= self._coalesce_s:
            return self._send(("chunk", fields))
        if pending is None:
            pending = self._pending = _PendingChunk(fields, due=self._last_sent + self._coalesce_s)
            _FLUSHER.schedule(self, pending.due)
        pending.deltas.append(str(fields.get("delta") or ""))
        return self._cancelled

    def _flush_due(self) -> None:
        """Called by the flusher when a window ended: publish what waits (an error is kept for
        the request's thread)."""
        with self._lock:
            if self._pending is None or self.closed or self._failure is not None:
                return
            try:
                self._send(None)
            except Exception as exc:  # noqa: BLE001 - raised in the request's thread by its next call
                self._failure = exc

    def _raise_failure(self) -> None:
        """Raise, once, what a background flush failed with (its text still waits)."""
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    def _send(self, event: tuple[str, dict[str, Any]] | None) -> bool:
        """One round trip: the waiting chunk, then ``event``, then the cancel (and lease) check.
        Returns True if the request has been cancelled (lock held)."""
        pipe = self._client.pipeline(transaction=False)
        pending, self._pending = self._pending, None
        first_seq = self.next_seq
        if pending is not None:
            self._stage(pipe, "chunk", pending.merged())
        if event is not None:
            self._stage(pipe, *event)
        if self._lease is not None:
            pipe.mget(self._cancel, self._lease.key)
        else:
            pipe.exists(self._cancel)
        self._last_sent = time.monotonic()
        try:
            results = pipe.execute()
        except BaseException:
            # Nothing was published (as far as this run knows): the text waits for the next
            # event, and the seq numbers it was given are given again.
            self._pending, self.next_seq = pending, first_seq
            raise
        if self._lease is not None:
            cancelled, holder = results[-1]
            if not self._lease.holds(holder):
                raise LeaseLost(f"request {self.request_id} is now run by another worker")
        else:
            cancelled = results[-1]
        self._cancelled = self._cancelled or bool(cancelled)
        return self._cancelled

    def cancel_requested(self) -> bool:
        """True if a producer set the cancel key (one round trip)."""
        return bool(self._client.exists(self._cancel))

    def finish(self, event_type: str, reply: ChatReply, **fields: Any) -> bool:
        """Store ``reply`` and publish the terminal event, atomically; False (and nothing
        written) if the request already has a reply. Raises ``LeaseLost`` if another worker
        took the request over."""
        if event_type not in TERMINAL_EVENT_TYPES:
            raise ValueError(f"{event_type!r} is not a terminal event")
        with self._lock:
            # A background flush that failed (a lost lease, Redis gone) ends the run as a failed
            # chunk write would have; its text still waits, for the rerun to read nothing of.
            self._raise_failure()
            if self.closed:
                raise StreamClosed(f"request {self.request_id} already ended")
            return self._finish(event_type, reply, fields)

    def _finish(self, event_type: str, reply: ChatReply, fields: dict[str, Any]) -> bool:
        pending, self._pending = self._pending, None
        first_seq = self.next_seq
        chunk = self._event("chunk", pending.merged()) if pending is not None else ""
        if pending is not None:
            self.next_seq += 1  # the waiting text goes out just before the terminal event
        payload = self._event(event_type, {**fields, "reply": reply})
        lease = self._lease
        release = lease.release_keys() if lease else ("", "", "")
        if lease is not None:
            lease.stop_renewing()  # the script releases the lease with the reply
        try:
            written = self._client.eval(
                _FINISH,
                8,
                keys.reply_key(self.request_id),
                self._channel,
                self._stream,
                release[0],
                pending_set.PENDING_SET,
                pending_set.record_key(self.request_id),
                release[1],
                release[2],
                reply.model_dump_json(),
                self._store.ttl_s,
                payload,
                self._maxlen,
                self._ttl_s,
                lease.token if lease else "",
                self.request_id,
                chunk,
            )
        except BaseException:
            self._pending, self.next_seq = pending, first_seq
            raise
        if written == -1:
            raise LeaseLost(f"request {self.request_id} is now run by another worker")
        self.closed = True
        if written == 1:
            self.next_seq += 1
            if lease is not None:
                lease.released = True
        else:
            self.next_seq = first_seq
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
        now = time.monotonic()
        if now >= self._refresh_ttl_at:  # the first event sets the TTL; a long stream renews it
            pipe.expire(self._stream, self._ttl_s)
            self._refresh_ttl_at = now + self._ttl_s / 4
        self.next_seq += 1


_FLUSHER = _Flusher()


def start_event(request_id: str, chain: str, worker: str) -> str:
    """The JSON of a request's ``start`` event as its first event (``seq`` 0)."""
    event = StreamEvent(
        type="start", request_id=request_id, seq=0, ts=round(time.time(), 6), chain=chain, worker=worker
    )
    return event.model_dump_json(exclude_none=True)
