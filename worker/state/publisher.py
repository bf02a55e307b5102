"""Publishing a request's events: pub/sub for live subscribers, a Redis Stream for replay.

Each write is one Lua script, one round trip: it checks the lease, then PUBLISHes and XADDs
the events (and sets the stream's TTL on the first event, renewed by a stream longer than a
quarter of the TTL) and reads the cancel key. The lease check and the write are one atomic
step, so a worker whose lease was taken over writes nothing more: its script refuses, and the
run stops with ``LeaseLost``. A publisher with no lease (a rejected message's report) writes
only while no worker holds the request's lease: an invalid copy of a running request must not
answer for it. The terminal event and the stored reply are written by one script too, reply
first, and only if no reply is stored yet and the lease check passes: a request gets exactly
one reply and one terminal event, however many workers ran it. That script also publishes a
coalesced chunk still waiting, releases the lease and ends the request's pending record and
resend count (``worker.state.pending``): one round trip ends a request.

Coalescing (``coalesce_s`` > 0, ``CASCADE_COALESCE_MS``, 2 ms by default): a chunk that comes
less than ``coalesce_s`` after the last publish waits, and the chunks that follow it within the
window join it, each in its group (one choice's text, one tool call's fragments: see
``worker.state.coalescing``; one event per group); the process's timer (``providers.timer``)
publishes them at the window's end, and any other event (``fallback``, the terminal event)
publishes them first. A chunk after a quiet window (the first one, say) still goes out at once,
so the first token is not delayed, and a fast stream costs one round trip per window instead of
one per chunk. ``seq`` stays strictly
increasing, a cancel seen by a background flush is reported by the next ``emit``, and a
failure there (a lost lease, Redis gone) is raised by the next call.

The event budget: the stream is XADDed with ``MAXLEN ~ events_maxlen``, which would drop a long
request's first entries and make "replay from the start" silently false. So a request's events
stay below ``events_maxlen``: past half of its chunk budget (``events_maxlen`` less a reserve of
a tenth) the coalescing window grows as the budget shrinks, and once the budget is spent chunks
merge into one waiting chunk per group that goes out with the next ``fallback``, hand-off or the terminal
event, while the lease and cancel key are still read every ``MAX_WINDOW_S``. The reserve keeps
room for the ``fallback`` events, the last chunks of each attempt and the terminal event, which
are never held (the budget shrinks by what several groups waiting at once would add to those);
MAXLEN stays as the memory bound for a request that still outgrows it.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any, cast

import redis

from providers.timer import TIMER, Timer
from tasks.contract import keys
from tasks.contract.images import ImageReply
from tasks.contract.schemas import TERMINAL_EVENT_TYPES, ChatReply, StreamEvent
from worker.state import lua
from worker.state.coalescing import PendingChunks
from worker.state.lease import LeaseLost
from worker.state.store import ReplyStore


class StreamClosed(RuntimeError):
    """An event was emitted after the request's terminal event."""


# The longest a chunk waits once a request nears its event budget, and how often a request that
# spent its budget still reads its lease and cancel key.
MAX_WINDOW_S = 1.0
# The shortest window past half the budget, even with coalescing off.
_SLOW_WINDOW_S = 0.05
# How soon a flush that found the request's thread publishing tries again, at least.
_RETRY_S = 0.001


def chunk_budget(events_maxlen: int) -> int:
    """How many events a request may write before its chunks are held (see the module
    docstring): ``events_maxlen`` less a reserve of a tenth (3 at least)."""
    return events_maxlen - max(3, events_maxlen // 10)


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
        token: str = "",
        coalesce_s: float = 0.0,
        stream_ttl_set: bool = False,
        timer: Timer = TIMER,
    ) -> None:
        self._client = client
        self._timer = timer  # flushes a waiting chunk when its window ends
        self._clock = timer.clock
        self.request_id = request_id
        self._store = store
        self._maxlen = events_maxlen
        self._budget = chunk_budget(events_maxlen)
        self._ttl_s = events_ttl_s
        self.next_seq = next_seq
        self.closed = False
        # The run's lease token: its writes pass the lease check only while the lease holds it.
        # With none (a rejected message's report), writes pass only while no worker holds it.
        self._token = token
        self._lease_key = keys.lease_key(request_id)
        self.leased_elsewhere = False
        """Set when a publisher with no lease wrote nothing because a worker holds the request."""
        self._channel = keys.stream_channel(request_id)
        self._stream = keys.events_stream(request_id)
        self._cancel = keys.cancel_key(request_id)
        self._coalesce_s = coalesce_s
        self._lock = threading.RLock()
        self._pending: PendingChunks | None = None
        self._widest = 1  # the most groups that waited at once
        self._last_sent = -float("inf")
        self._cancelled = False
        self._failure: BaseException | None = None
        # The first event sets the stream's TTL, unless it was published already with its TTL
        # (the ``start`` event of ``worker.state.session``).
        self._refresh_ttl_at = self._clock() + events_ttl_s / 4 if stream_ttl_set else -float("inf")

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

        With coalescing on, or near the event budget, a ``chunk`` may wait to be published with
        the chunks that follow it; any other event publishes a waiting chunk first.
        """
        if event_type in TERMINAL_EVENT_TYPES:
            raise ValueError(f"use finish() for the terminal event {event_type!r}")
        with self._lock:
            self._raise_failure()
            if self.closed:
                raise StreamClosed(f"request {self.request_id} already ended")
            if event_type == "chunk":
                window = self._window()
                if window is None or window > 0:
                    return self._gather(fields, window)
            return self._send((event_type, fields))

    def flush(self) -> bool:
        """Publish a waiting chunk now, if there is one; return True if the request has been
        cancelled."""
        with self._lock:
            self._raise_failure()
            return self._send(None) if self._pending is not None else self._cancelled

    def _window(self) -> float | None:
        """How long the next chunk may wait: ``coalesce_s``, longer past half the event budget;
        None once the budget is spent (the chunk waits for the next other event)."""
        # Held chunks go out one event per group (``worker.state.coalescing``): with G groups
        # waiting at once, the flush that spends the budget and the final one each take G
        # events, so the budget shrinks by what the reserve would otherwise have to hold.
        left = self._budget - self.next_seq - 2 * (self._widest - 1)
        if left <= 0:
            return None
        half = self._budget / 2
        if left >= half:
            return self._coalesce_s
        return min(MAX_WINDOW_S, max(self._coalesce_s, _SLOW_WINDOW_S) * half / left)

    def _gather(self, fields: dict[str, Any], window: float | None) -> bool:
        """Coalescing: publish the chunk now after a quiet window, else let it wait (lock held)."""
        pending = self._pending
        if pending is not None and not pending.same_attempt(fields):
            self._send(None)  # never merge chunks of two attempts
            pending = None
            window = self._window()
        now = self._clock()
        quiet = now - self._last_sent
        if pending is None and window is not None and quiet >= window:
            return self._send(("chunk", fields))
        if pending is None:
            due = self._last_sent + window if window is not None else math.inf
            pending = self._pending = PendingChunks(due=due)
            if window is not None:
                self._timer.schedule(self, due, self.flush_due)
        pending.add(fields)
        self._widest = max(self._widest, len(pending))
        if window is None and quiet >= MAX_WINDOW_S:
            self._check()  # the text waits, the lease and the cancel key are still read
        return self._cancelled

    def flush_due(self) -> None:
        """The timer's part when a window ended: publish what waits (an error is kept for the
        request's thread). While the request's thread holds the publisher (a round trip of its
        own) the flush tries again shortly instead of holding up the process's timer."""
        if not self._lock.acquire(blocking=False):
            self._timer.schedule(self, self._clock() + max(self._coalesce_s, _RETRY_S), self.flush_due)
            return
        try:
            if self._pending is None or self.closed or self._failure is not None or self._window() is None:
                return
            try:
                self._send(None)
            except Exception as exc:  # noqa: BLE001 - raised in the request's thread by its next call
                self._failure = exc
        finally:
            self._lock.release()

    def _raise_failure(self) -> None:
        """Raise, once, what a background flush failed with (its text still waits)."""
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    def _send(self, event: tuple[str, dict[str, Any]] | None) -> bool:
        """One round trip: the waiting chunk, then ``event``, written only if the lease check
        passes, then the cancel check. Returns True if the request has been cancelled (lock held)."""
        if self.closed:
            raise StreamClosed(f"request {self.request_id} already ended")
        pending, self._pending = self._pending, None
        first_seq = self.next_seq
        payloads = []
        if pending is not None:
            payloads += [self._next_event("chunk", fields) for fields in pending.events()]
        if event is not None:
            payloads.append(self._next_event(*event))
        try:
            self._write(payloads)
        except BaseException:
            # Nothing was published (as far as this run knows): the text waits for the next
            # event, and the seq numbers it was given are given again.
            self._pending, self.next_seq = pending, first_seq
            raise
        return self._cancelled

    def _check(self) -> None:
        """Read the lease and the cancel key, writing nothing (lock held)."""
        self._write([])

    def _write(self, payloads: list[str]) -> None:
        """Run ``lua.EMIT`` for ``payloads``: raise ``LeaseLost`` if the lease check refused."""
        now = self._clock()
        ttl = 0
        if payloads and now >= self._refresh_ttl_at:  # the first event sets the TTL; a long stream renews it
            ttl = self._ttl_s
        result = lua.EMIT.call(
            self._client,
            keys={
                "channel": self._channel,
                "events_stream": self._stream,
                "cancel_key": self._cancel,
                "lease_key": self._lease_key,
            },
            args={"events_maxlen": self._maxlen, "events_ttl_s": ttl, "token": self._token},
            rest=payloads,
        )
        self._last_sent = now
        if result in (-1, -2):
            self._refused(int(result))
        if ttl:
            self._refresh_ttl_at = now + self._ttl_s / 4
        self._cancelled = self._cancelled or bool(result)

    def _refused(self, code: int) -> None:
        """The lease check refused a write: raise ``LeaseLost``."""
        self.leased_elsewhere = code == -2
        holder = "a worker holds its lease" if code == -2 else "it is now run by another worker"
        raise LeaseLost(f"request {self.request_id}: not written, {holder}")

    def cancel_requested(self) -> bool:
        """True if a producer set the cancel key (one round trip)."""
        return bool(self._client.exists(self._cancel))

    def finish(self, event_type: str, reply: ChatReply | ImageReply, **fields: Any) -> bool:
        """Store ``reply`` and publish the terminal event, atomically; False (and nothing
        written) if the request already has a reply, or if this publisher has no lease and a
        worker holds the request's (``leased_elsewhere`` then). Raises ``LeaseLost`` if another
        worker took this publisher's lease over."""
        if event_type not in TERMINAL_EVENT_TYPES:
            raise ValueError(f"{event_type!r} is not a terminal event")
        with self._lock:
            # A background flush that failed (a lost lease, Redis gone) ends the run as a failed
            # chunk write would have; its text still waits, for the rerun to read nothing of.
            self._raise_failure()
            if self.closed:
                raise StreamClosed(f"request {self.request_id} already ended")
            return self._finish(event_type, reply, fields)

    def _finish(self, event_type: str, reply: ChatReply | ImageReply, fields: dict[str, Any]) -> bool:
        if self._pending is not None and len(self._pending) > 1:
            # The terminal script takes one waiting chunk: several groups go out first, in a
            # round trip of their own (which checks the lease as the terminal write does).
            self._send(None)
        pending, self._pending = self._pending, None
        first_seq = self.next_seq
        chunk = self._next_event("chunk", pending.events()[0]) if pending is not None else ""
        payload = self._next_event(event_type, {**fields, "reply": reply})
        try:
            written = lua.FINISH.call(
                self._client,
                keys={
                    "reply_key": keys.reply_key(self.request_id),
                    "channel": self._channel,
                    "events_stream": self._stream,
                    "lease_key": self._lease_key,
                    "pending_set": keys.PENDING_SET,
                    "pending_record": keys.pending_record(self.request_id),
                    "inflight_record": keys.inflight_record(self.request_id),
                    "inflight_set": keys.INFLIGHT_SET,
                    "resends": keys.RESENDS,
                },
                args={
                    "reply": reply.model_dump_json(),
                    "reply_ttl_s": self._store.ttl_s,
                    "terminal_event": payload,
                    "events_maxlen": self._maxlen,
                    "events_ttl_s": self._ttl_s,
                    "token": self._token,
                    "request_id": self.request_id,
                    "waiting_chunk": chunk,
                },
            )
        except BaseException:
            self._pending, self.next_seq = pending, first_seq
            raise
        if written == -1:
            self._pending, self.next_seq = pending, first_seq
            self._refused(-1)
        self.closed = True
        self.leased_elsewhere = written == -2
        if written != 1:
            self.next_seq = first_seq
        return bool(written == 1)

    def _next_event(self, event_type: str, fields: dict[str, Any]) -> str:
        """The JSON of the next event, which takes the next ``seq``."""
        payload = self._event(event_type, fields)
        self.next_seq += 1
        return payload

    def _event(self, event_type: str, fields: dict[str, Any]) -> str:
        event = StreamEvent(
            type=event_type,  # type: ignore[arg-type]
            request_id=self.request_id,
            seq=self.next_seq,
            ts=round(time.time(), 6),
            **fields,
        )
        return event.model_dump_json(exclude_none=True)


def start_event(request_id: str, chain: str, worker: str) -> str:
    """The JSON of a request's ``start`` event as its first event (``seq`` 0)."""
    event = StreamEvent(
        type="start", request_id=request_id, seq=0, ts=round(time.time(), 6), chain=chain, worker=worker
    )
    return event.model_dump_json(exclude_none=True)
