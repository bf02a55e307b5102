"""The one owner of a run's state in Redis: ``RunSession`` opens, publishes, hands off, finishes
and abandons a run.

- ``open``: the run's first round trip, one script (``lua.OPEN``). It takes the lease (a random
  token with a short TTL, ``worker.state.lease``) and records the task message to resend if this
  worker dies, reads where the request stands — whether another worker holds it (then this copy
  is a duplicate), where its events stopped (a rerun or a hand-off continues their ``seq``),
  whether a reply is stored, whether a producer cancelled it, whether the first provider cools
  down — and publishes a new request's ``start`` event, the only place that event is written.
  The process's timer renews the lease from then on.
- ``emit`` / ``flush`` / ``cancel_requested``: the run's events (``worker.state.publisher``),
  written only while the lease holds this run's token; a run whose lease was taken over stops
  with ``LeaseLost``.
Every record a run writes (in flight, pending) names its task (``cascade.chat`` or
``cascade.image``), so a reaper resends the request as the task it is.

- ``hand_off``: the chain continues on another queue. One script records the message as pending
  (``worker.state.pending``) and releases the lease, then the ``TaskSender`` sends it: the next
  queue's worker may take the message at once, and would drop it as a duplicate of a lease
  still held; if the send fails or this process dies, a reaper finds the request pending,
  unleased and unqueued, and sends it.
- ``store_image``: a generated image's bytes (``cascade.image``), under the lease as events
  are, written before the event that announces them and before the reply that lists them.
- ``finish``: the reply, the terminal event and the lease's release, one script.
- ``abandon``: cut off from Redis before the request ended, the run keeps its lease to lapse
  (releasing would drop the request's only record); a reaper sends the request again.
- ``close`` (or leaving the ``with`` block): a run that ended any other way (a duplicate, a
  stored reply, an error) releases its lease.

The lease is let go only here: the reply's script, the hand-off's, or ``close``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import redis

from providers.timer import TIMER, Timer
from tasks.contract import keys
from tasks.contract.images import ImageReply
from tasks.contract.schemas import REQUEST_ID_HEADER, TASK_NAME, ChatReply
from tasks.producer.pending import PENDING_TTL_S, now_ms
from worker.boundary.envelope import CASCADE_TASKS
from worker.state import lua
from worker.state.deaths import carried_window
from worker.state.lease import LeaseLost, RequestLease
from worker.state.pending import request_id_in
from worker.state.publisher import EventPublisher, start_event
from worker.state.recovery import LostRun, read_lost_run
from worker.state.store import ReplyStore

if TYPE_CHECKING:
    from celery import Celery

    from worker.runtime import WorkerRuntime

logger = logging.getLogger(__name__)


class TaskSender(Protocol):
    """Sends a Cascade task message: a hand-off, or a reaper's resend."""

    def send(self, queue: str, kwargs: dict[str, Any], request_id: str | None = None, *, task: str = TASK_NAME) -> None:
        """Send a ``task`` message with ``kwargs`` to ``queue``, with the request id header
        (read from ``kwargs`` when not given)."""


class CelerySender:
    """A ``TaskSender`` through a Celery app."""

    def __init__(self, app: Celery) -> None:
        self._app = app

    def send(self, queue: str, kwargs: dict[str, Any], request_id: str | None = None, *, task: str = TASK_NAME) -> None:
        """Send ``task`` (one of ``CASCADE_TASKS``) to ``queue`` (see ``TaskSender``)."""
        if task not in CASCADE_TASKS:
            raise ValueError(f"not a Cascade task: {task!r}")
        request_id = request_id if request_id is not None else request_id_in(kwargs)
        headers = {REQUEST_ID_HEADER: request_id} if request_id is not None else {}
        self._app.send_task(task, kwargs=kwargs, queue=queue, headers=headers)

    def resend(self, queue: str, kwargs: dict[str, Any], task: str) -> None:
        """A reaper's resend (``worker.state.reaper.Resend``) of a ``task`` message."""
        self.send(queue, kwargs, task=task)


@dataclass(frozen=True)
class Opening:
    """Where a request stood when this run took it."""

    last_event: Any
    """The last entry of its events stream (an ``XREVRANGE ... COUNT 1`` reply; empty if none)."""
    stored_reply: bytes | None
    """Its stored ``ChatReply`` JSON, if it was answered already."""
    cancelled: bool
    """A producer set its cancel key."""
    cooling: bool | None
    """Whether the first provider to try cools down; None if that provider has no cooldown."""
    started: bool
    """This run published the ``start`` event (as ``seq`` 0)."""


class RunSession:
    """One run of one request on this worker (see the module docstring)."""

    def __init__(
        self,
        client: redis.Redis,
        request_id: str,
        *,
        replies: ReplyStore,
        worker: str,
        lease_ttl_s: float,
        record_ttl_s: int,
        events_maxlen: int,
        events_ttl_s: int,
        coalesce_s: float = 0.0,
        sender: TaskSender | None = None,
        timer: Timer = TIMER,
        task: str = TASK_NAME,
    ) -> None:
        self._client = client
        self.task = task
        self.request_id = request_id
        self.replies = replies
        self.worker = worker
        self._record_ttl_s = record_ttl_s
        self._events_maxlen = events_maxlen
        self._events_ttl_s = events_ttl_s
        self._coalesce_s = coalesce_s
        self._sender = sender
        self._timer = timer
        self.lease = RequestLease(client, request_id, ttl_s=lease_ttl_s, worker=worker, timer=timer)
        self._held = False  # this run took the lease and has not let it go
        self._publisher: EventPublisher | None = None

    @classmethod
    def of(
        cls,
        runtime: WorkerRuntime,
        request_id: str,
        *,
        sender: TaskSender | None = None,
        timer: Timer = TIMER,
        task: str = TASK_NAME,
    ) -> RunSession:
        """A session of ``runtime``'s worker, with its settings, for a ``task`` request."""
        settings = runtime.settings
        return cls(
            runtime.redis,
            request_id,
            replies=runtime.replies,
            worker=runtime.worker_name,
            lease_ttl_s=settings.lease_ttl_s,
            record_ttl_s=settings.broker_visibility_timeout_s,
            events_maxlen=settings.events_maxlen,
            events_ttl_s=settings.events_ttl_s,
            coalesce_s=settings.coalesce_ms / 1000,
            sender=sender,
            timer=timer,
            task=task,
        )

    @property
    def can_hand_off(self) -> bool:
        """Whether this session can send the request on to another queue."""
        return self._sender is not None

    # --- open -------------------------------------------------------------------------------

    def open(
        self,
        queue: str,
        kwargs: dict[str, Any],
        *,
        window: tuple[float, float],
        start_chain: str | None,
        cooldown_key: str | None,
        next_seq: int = 0,
    ) -> Opening | None:
        """Take the lease, recording the message (``queue``, ``kwargs``) and the run's
        ``window`` (its start and deadline, unix times, which a resumed run keeps), read where
        the request stands and publish its ``start`` event (on ``start_chain``; None for a
        hand-off) if it is new. Events go on from ``next_seq`` at least. None if a live worker
        holds the lease: this copy is a duplicate."""
        lease = self.lease
        record = json.dumps(
            {"queue": queue, "kwargs": kwargs, "task": self.task, "started_at": window[0], "deadline_at": window[1]}
        )
        start = start_event(self.request_id, start_chain, self.worker) if start_chain is not None else ""
        result = lua.OPEN.call(
            self._client,
            keys={
                "lease_key": lease.key,
                "inflight_record": keys.inflight_record(self.request_id),
                "inflight_set": keys.INFLIGHT_SET,
                "events_stream": keys.events_stream(self.request_id),
                "reply_key": keys.reply_key(self.request_id),
                "cancel_key": keys.cancel_key(self.request_id),
                "channel": keys.stream_channel(self.request_id),
                "cooldown_key": cooldown_key or "",
            },
            args={
                "token": lease.token,
                "lease_ttl_ms": lease.ttl_ms,
                "record": record,
                "record_ttl_s": self._record_ttl_s,
                "expires_at_ms": lease.expires_at_ms(),
                "request_id": self.request_id,
                "start_event": start,
                "events_maxlen": self._events_maxlen,
                "events_ttl_s": self._events_ttl_s,
            },
        )
        if result is None:
            return None
        self._held = True
        lease.start_renewing()
        last, reply, cancelled, cooling, started = result
        opening = Opening(
            # As redis-py's XREVRANGE gives it: the script's reply has each entry's fields flat.
            last_event=[(entry_id, dict(zip(fields[::2], fields[1::2], strict=True))) for entry_id, fields in last],
            stored_reply=reply,
            cancelled=bool(cancelled),
            cooling=None if cooling == -1 else bool(cooling),
            started=bool(started),
        )
        seq = 1 if opening.started else EventPublisher.seq_after(opening.last_event)
        self._publisher = EventPublisher(
            self._client,
            self.request_id,
            store=self.replies,
            events_maxlen=self._events_maxlen,
            events_ttl_s=self._events_ttl_s,
            next_seq=max(seq, next_seq),
            token=lease.token,
            coalesce_s=self._coalesce_s,
            stream_ttl_set=opening.started,
            timer=self._timer,
        )
        return opening

    # --- events -----------------------------------------------------------------------------

    @property
    def publisher(self) -> EventPublisher:
        """The run's event publisher (once opened)."""
        if self._publisher is None:
            raise RuntimeError(f"the run of {self.request_id} is not open")
        return self._publisher

    @property
    def next_seq(self) -> int:
        """The ``seq`` the next event takes."""
        return self.publisher.next_seq

    def emit(self, event_type: str, **fields: Any) -> bool:
        """Publish a non-terminal event; True if the request has been cancelled."""
        return self.publisher.emit(event_type, **fields)

    def flush(self) -> bool:
        """Publish a waiting chunk now; True if the request has been cancelled."""
        return self.publisher.flush()

    def cancel_requested(self) -> bool:
        """True if a producer set the cancel key (one round trip)."""
        return self.publisher.cancel_requested()

    def store_image(self, key: str, data: bytes, ttl_s: int) -> None:
        """Store an image's bytes at ``key`` for ``ttl_s`` seconds (one script, lease-checked);
        raises ``LeaseLost`` if another worker took the request over."""
        written = lua.STORE_IMAGE.call(
            self._client,
            keys={"lease_key": self.lease.key, "image_key": key},
            args={"token": self.lease.token, "data": data, "ttl_s": max(1, int(ttl_s))},
        )
        if written != 1:
            raise LeaseLost(f"request {self.request_id}: image not stored, it is now run by another worker")

    def lost_run(self, since_seq: int, chain: list[str]) -> LostRun:
        """What an earlier run of this request, which died, left in its stream from ``since_seq``."""
        return read_lost_run(self._client, self.request_id, since_seq, chain)

    def carried_window(self) -> tuple[float, float] | None:
        """The first run's start and deadline, if a run of this request died (``worker.state.deaths``)."""
        return carried_window(self._client, self.request_id)

    # --- ends -------------------------------------------------------------------------------

    def finish(self, event_type: str, reply: ChatReply | ImageReply, **fields: Any) -> bool:
        """Store ``reply``, publish the terminal event and release the lease, in one script;
        False (nothing written) if the request has a reply already. Raises ``LeaseLost`` if
        another worker took the lease over."""
        self.lease.stop_renewing()  # the script may release the lease
        written = self.publisher.finish(event_type, reply, **fields)
        if written:
            self._held = False
        return written

    def stored_reply(self) -> ChatReply | ImageReply | None:
        """The reply stored for the request, if any."""
        return self.replies.get(self.request_id)

    def hand_off(self, queue: str, kwargs: dict[str, Any]) -> None:
        """Send the request on to ``queue`` with ``kwargs`` (its hand-off state among them),
        after a waiting chunk, recording it as pending and releasing the lease first."""
        if self._sender is None:
            raise RuntimeError("this session has no sender to hand the request off with")
        self.flush()  # a coalesced chunk goes out before the next queue's events
        self.lease.stop_renewing()
        lua.HAND_OFF.call(
            self._client,
            keys={
                "pending_set": keys.PENDING_SET,
                "pending_record": keys.pending_record(self.request_id),
                **self._lease_keys(),
            },
            args={
                "record": json.dumps({"queue": queue, "kwargs": kwargs, "task": self.task}),
                "pending_ttl_s": PENDING_TTL_S,
                "sent_at_ms": now_ms(),
                "token": self.lease.token,
                "request_id": self.request_id,
            },
        )
        self._held = False
        self._sender.send(queue, kwargs, self.request_id, task=self.task)

    def abandon(self) -> None:
        """Stop renewing the lease but keep it and the in-flight record: the lease lapses
        within its TTL and a reaper sends the request again."""
        self.lease.stop_renewing()
        self._held = False

    def close(self) -> None:
        """Release the lease if this run still holds it (the run ended without a reply of its
        own, a hand-off, or being abandoned)."""
        self.lease.stop_renewing()
        if not self._held:
            return
        self._held = False
        try:
            lua.RELEASE.call(
                self._client,
                keys=self._lease_keys(),
                args={"token": self.lease.token, "request_id": self.request_id},
            )
        except redis.RedisError:
            logger.warning("could not release the lease of %s; it expires by itself", self.request_id)

    def _lease_keys(self) -> dict[str, str]:
        return {
            "lease_key": self.lease.key,
            "inflight_record": keys.inflight_record(self.request_id),
            "inflight_set": keys.INFLIGHT_SET,
        }

    def __enter__(self) -> RunSession:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None and issubclass(exc_type, (redis.ConnectionError, redis.TimeoutError)):
            # Cut off from Redis before the request ended: releasing would drop its only record.
            self.abandon()
        self.close()
