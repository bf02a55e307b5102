"""What every Cascade task does with one validated request, whatever its kind: open the run,
walk the chain, end with exactly one terminal event and one stored reply — or hand the request
off to another queue with its history.

``Run`` is that, written once; a task's runner says only what is its own: the chain walk
(``_walk``: a ``providers.chain.ChainWalk`` of its provider kind, with ``self`` as listener),
the reply (``_reply``) and who hears of the outcome (``_finished``, ``_handed_off``).
``tasks.runner.RequestRunner`` runs ``cascade.chat``, ``tasks.image_runner.ImageRunner``
``cascade.image``. Everything a run writes or reads in Redis goes through its
``worker.state.session.RunSession``: the lease, idempotency by request id, the ``start``
event, the resume of a run whose worker died, the terminal event and reply in one script.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import redis
from celery.exceptions import SoftTimeLimitExceeded
from pydantic import BaseModel, TypeAdapter

from providers import errors
from providers.chain import ChainOutcome, ChainWalk, CooldownGate
from tasks.contract.images import ImageReply, ImageRequest
from tasks.contract.schemas import (
    DEFAULT_QUEUE,
    TASK_NAME,
    AnyReply,
    AttemptRecord,
    ChainMeta,
    ChatReply,
    ChatRequest,
    ErrorInfo,
    HandOff,
    Timings,
)
from worker.runtime import RequestObserver, WorkerRuntime
from worker.state.cooldown import ReadAhead, RedisCooldowns
from worker.state.lease import LeaseLost
from worker.state.recovery import WORKER_LOST
from worker.state.session import RunSession, TaskSender

# How often a wait (first-output delay, retry backoff) looks for a cancel.
WAIT_SLICE_S = 0.05

Req = TypeVar("Req", ChatRequest, ImageRequest)
Rep = TypeVar("Rep", ChatReply, ImageReply)
_ANY_REPLY: TypeAdapter[ChatReply | ImageReply] = TypeAdapter(AnyReply)


@dataclass
class TaskContext:
    """What Celery knows about the delivery."""

    task_id: str | None
    queue: str | None
    submitted_at: float | None = None
    started_at_wall: float = field(default_factory=time.time)
    started_at: float = field(default_factory=time.monotonic)
    local_queues: frozenset[str] | None = None


def checked_handoff(handoff: HandOff, chain: list[str]) -> HandOff:
    """``handoff`` if it can continue ``chain``; else ValueError saying why. A hand-off comes in
    a message anyone who can write to the queue can forge, or from a worker of an earlier
    deploy whose chain was longer."""
    if handoff.start_index >= len(chain):
        raise ValueError(f"start_index {handoff.start_index} is past the chain ({len(chain)} providers)")
    moments = (handoff.deadline_at, handoff.started_at, handoff.first_chunk_at, handoff.submitted_at)
    if not all(math.isfinite(moment) for moment in moments if moment is not None):
        raise ValueError("its times must be finite numbers")
    return handoff


def task_message(request: BaseModel, handoff: HandOff | None = None) -> dict[str, Any]:
    """The keyword arguments of a task message for ``request`` (and its hand-off state).
    Raises ValueError for a request that cannot be written as JSON."""
    message: dict[str, Any] = {"request": json.loads(request.model_dump_json(exclude_none=True))}
    if handoff is not None:
        message["handoff"] = handoff.model_dump(mode="json")
    return message


class Run(Generic[Req, Rep]):
    """Runs one request (or its continuation after a hand-off) on this worker.

    ``session`` is the run's state in Redis; without one, a session of ``runtime`` is built,
    handing off through ``sender`` (none: the chain never leaves this worker). ``message`` is
    the task's keyword arguments, recorded to resend the request if this worker dies (built
    from the request when not given)."""

    task = TASK_NAME
    """The task the run's messages (hand-offs, resends) are sent as."""

    def __init__(
        self,
        runtime: WorkerRuntime,
        request: Req,
        context: TaskContext,
        *,
        handoff: HandOff | None = None,
        session: RunSession | None = None,
        sender: TaskSender | None = None,
        message: dict[str, Any] | None = None,
    ) -> None:
        self.runtime = runtime
        self.request: Req = request
        self.context = context
        self.handoff = handoff
        self.request_id: str = request.request_id or ""
        self.session = session or RunSession.of(runtime, self.request_id, sender=sender, task=self.task)
        self._message = message
        self._log = logging.getLogger(type(self).__module__)
        settings = runtime.settings
        if handoff is not None:
            # A hand-off's deadline is the first run's, never past what the configuration allows.
            self.deadline_at = min(handoff.deadline_at, context.started_at_wall + settings.max_timeout_s)
            self.started_at_wall = handoff.started_at
            self.first_chunk_at = handoff.first_chunk_at
        else:
            timeout = min(request.timeout_s or settings.default_timeout_s, settings.max_timeout_s)
            self.deadline_at = context.started_at_wall + timeout
            self.started_at_wall = context.started_at_wall
            self.first_chunk_at = None
        self.deadline = context.started_at + (self.deadline_at - context.started_at_wall)
        first_id = settings.chains[request.chain][handoff.start_index if handoff else 0]
        self._first_id = first_id
        self._cooldown_key = RedisCooldowns.key_of(first_id, settings.providers[first_id].cooldown_failures)
        self._cooldowns: CooldownGate = runtime.cooldowns
        self._last_cancel_check = 0.0

    # --- what a task's runner says --------------------------------------------------------

    def _walk(self, provider_ids: list[str], fields: dict[str, Any]) -> ChainWalk[Any, Any]:
        """The chain walk over ``provider_ids``, built with ``fields`` (``ChainWalk``'s own:
        deadline, listener, cooldowns, where to start, the attempts so far...)."""
        raise NotImplementedError

    def _reply(self, status: str, outcome: ChainOutcome[Any] | None, meta: ChainMeta, error: ErrorInfo | None) -> Rep:
        """The reply to store for a run that ended with ``status``."""
        raise NotImplementedError

    def _completed(self, outcome: ChainOutcome[Any]) -> ChainOutcome[Any]:
        """The chain's outcome, with whatever the task adds to a finished chain (chat: the
        hallucination risk score); as it is by default."""
        return outcome

    def _finished(self, reply: Rep) -> None:
        """Tell whoever watches (telemetry) that the request ended with ``reply``."""

    def _handed_off(self, state: HandOff, queue: str) -> None:
        """Tell whoever watches that the request continues on ``queue``."""

    # --- the run ----------------------------------------------------------------------------

    def run(self) -> ChatReply | ImageReply | HandOff | None:
        """Open the run, run the request to its terminal event and return the stored reply, or
        return the hand-off state if the chain continues on another queue; None if another
        worker runs the request (this copy is a duplicate). Raises ``LeaseLost`` if another
        worker took the request over meanwhile. The session's lease is let go on the way out
        (kept to lapse if Redis was cut off)."""
        with self.session:
            opening = self.session.open(
                self.context.queue or DEFAULT_QUEUE,
                self._message if self._message is not None else task_message(self.request, self.handoff),
                window=(self.started_at_wall, self.deadline_at),
                start_chain=None if self.handoff else self.request.chain,
                cooldown_key=self._cooldown_key,
                next_seq=self.handoff.next_seq if self.handoff else 0,
            )
            if opening is None:
                return None
            if opening.cooling is not None:
                self._cooldowns = ReadAhead(self.runtime.cooldowns, self._first_id, opening.cooling)
            if opening.stored_reply:
                stored = _ANY_REPLY.validate_json(opening.stored_reply)
                self._log.info("request %s already answered (%s); not running it again", self.request_id, stored.status)
                return stored
            return self._run(opening.started, opening.cancelled)

    def _run(self, started: bool, cancelled: bool) -> Rep | ChatReply | ImageReply | HandOff:
        provider_ids = self.runtime.settings.chains[self.request.chain]
        start_index = self.handoff.start_index if self.handoff else 0
        attempts = list(self.handoff.attempts) if self.handoff else []
        expected_seq = self.handoff.next_seq if self.handoff else 0
        lost = None
        if not started and self.session.next_seq > expected_seq:
            # An earlier run of this very message died mid-way: continue where it stopped.
            lost = self.session.lost_run(expected_seq, provider_ids)
            self._keep_first_window()
            known = {record.attempt for record in attempts}
            attempts += [record for record in lost.attempts if record.attempt not in known]
            if lost.resume_index is not None:
                start_index = lost.resume_index
            self._log.warning("request %s: resuming a run that lost its worker", self.request_id)
        run = self._walk(
            provider_ids,
            {
                "deadline": self.deadline,
                "listener": self,
                "worker": self.runtime.worker_name,
                "wait": self._wait,
                "cooldowns": self._cooldowns,
                "start_index": start_index,
                "attempts": attempts,
                "local_queues": self.context.local_queues if self.session.can_hand_off else None,
            },
        )
        try:
            if lost and lost.lost:
                cancelled = (
                    self.session.emit(
                        "fallback", provider=lost.lost.provider, attempt=lost.lost.attempt, error_type=WORKER_LOST
                    )
                    or cancelled
                )
            if cancelled:
                raise errors.Cancelled("cancelled before it started")
            outcome = self._completed(run.execute())
        except LeaseLost:
            raise  # another worker runs the request now: it, not this run, will answer
        except errors.Cancelled as exc:
            return self._finish("cancelled", run, None, ErrorInfo(type=exc.code, message=exc.message))
        except SoftTimeLimitExceeded:
            stop = errors.TimeLimitExceeded("the worker's soft time limit was reached")
            return self._finish("error", run, None, ErrorInfo(type=stop.code, message=stop.message))
        except errors.RequestStopped as exc:
            return self._finish("error", run, None, ErrorInfo(type=exc.code, message=exc.message))
        except (redis.ConnectionError, redis.TimeoutError):
            # Cut off from Redis: an error reply now would fail the request for an outage and
            # leave a hole in its seq. The run stops; its lease lapses and a reaper resends it.
            self._log.warning("request %s lost its Redis connection; it will be sent again", self.request_id)
            raise
        except Exception as exc:  # noqa: BLE001 - a bug must still end the stream and store a reply
            self._log.exception("request %s failed inside the worker", self.request_id)
            error = ErrorInfo(type="internal_error", message=f"internal error ({type(exc).__name__})")
            return self._finish("error", run, None, error)
        if outcome.handoff_index is not None:
            return self._hand_off(run, outcome.handoff_index)
        if outcome.error is not None:
            return self._finish("error", run, outcome, outcome.error)
        return self._finish("done", run, outcome, None)

    # --- the chain's listener ---------------------------------------------------------------

    def on_attempt_failed(self, record: AttemptRecord) -> None:
        """Publish a ``fallback`` event: subscribers discard what that attempt streamed."""
        self._log.warning(
            "request %s: %s attempt %d failed: %s", self.request_id, record.provider, record.attempt, record.error_type
        )
        cancelled = self.session.emit(
            "fallback", provider=record.provider, attempt=record.attempt, error_type=record.error_type
        )
        if cancelled:
            raise errors.Cancelled("cancelled by the producer")

    def _check_stop(self) -> None:
        """Raise ``DeadlineExceeded`` past the deadline (what every output checks first)."""
        if time.monotonic() >= self.deadline:
            raise errors.DeadlineExceeded("the request's deadline passed")

    # --- helpers --------------------------------------------------------------------------

    def _wait(self, seconds: float) -> None:
        """Sleep, waking every slice to honour the deadline and a cancel.

        The cancel key is read after each slice while time is left, not before the first nor
        after the last: the event published just before and the one just after a wait read
        it anyway, so a short wait (a provider's pace) costs no round trip.
        """
        until = time.monotonic() + seconds
        slept = False
        while True:
            now = time.monotonic()
            if now >= self.deadline:
                raise errors.DeadlineExceeded("the request's deadline passed")
            if now >= until:
                return
            if slept and self.session.cancel_requested():
                raise errors.Cancelled("cancelled by the producer")
            time.sleep(min(WAIT_SLICE_S, until - now, self.deadline - now))
            slept = True

    def _keep_first_window(self) -> None:
        """A resumed run keeps the start and deadline of the request's first run, never a fresh
        deadline of its own (``worker.state.deaths``)."""
        window = self.session.carried_window()
        if window is None:
            return
        self.started_at_wall = min(self.started_at_wall, window[0])
        self.deadline_at = min(self.deadline_at, window[1])
        self.deadline = self.context.started_at + (self.deadline_at - self.context.started_at_wall)

    def _notify(self, call: Callable[[RequestObserver], None]) -> None:
        """Tell every observer; a failing observer is logged, never allowed to fail the request."""
        for observer in self.runtime.observers:
            try:
                call(observer)
            except Exception:  # noqa: BLE001 - logged; an observer never fails the request
                self._log.exception("request observer %r failed", observer)

    def _hand_off(self, run: ChainWalk[Any, Any], index: int) -> HandOff:
        provider_id = self.runtime.settings.chains[self.request.chain][index]
        queue = self.runtime.settings.queue_of(provider_id)
        state = HandOff(
            start_index=index,
            attempts=run.attempts,
            next_seq=self.session.next_seq,
            queue_hops=(self.handoff.queue_hops if self.handoff else 0) + 1,
            deadline_at=self.deadline_at,
            started_at=self.started_at_wall,
            first_chunk_at=self.first_chunk_at,
            submitted_at=self.handoff.submitted_at if self.handoff else self.context.submitted_at,
        )
        self.session.hand_off(queue, task_message(self.request, state))
        self._log.info("request %s handed off to queue %s for %s", self.request_id, queue, provider_id)
        self._handed_off(state, queue)
        return state

    def _finish(
        self, event_type: str, run: ChainWalk[Any, Any], outcome: ChainOutcome[Any] | None, error: ErrorInfo | None
    ) -> Rep | ChatReply | ImageReply:
        status = {"done": "succeeded", "cancelled": "cancelled"}.get(event_type, "failed")
        reply = self._reply(status, outcome, self._meta(run, outcome), error)
        if not self.session.finish(event_type, reply, error=error):
            stored = self.session.stored_reply()
            self._log.warning("request %s was answered meanwhile; keeping that reply", self.request_id)
            return stored or reply
        self._finished(reply)
        self._log.info(
            "request %s %s via %s after %d attempt(s)",
            self.request_id,
            status,
            reply.meta.provider,
            reply.meta.total_attempts,
        )
        return reply

    def _meta(self, run: ChainWalk[Any, Any], outcome: ChainOutcome[Any] | None) -> ChainMeta:
        submitted_at = self.handoff.submitted_at if self.handoff else self.context.submitted_at
        started = self.started_at_wall

        def since_start_ms(moment: float | None) -> float | None:
            return None if moment is None else round(max(0.0, moment - started) * 1000, 3)

        timings = Timings(
            queued_ms=None if submitted_at is None else round(max(0.0, started - submitted_at) * 1000, 3),
            ttft_ms=since_start_ms(self.first_chunk_at),
            total_ms=since_start_ms(time.time()),
        )
        extra: dict[str, Any] = {"chain": self.request.chain}
        return ChainMeta(
            **run.meta(outcome),
            **extra,
            timings=timings,
            worker=self.runtime.worker_name,
            queue_hops=self.handoff.queue_hops if self.handoff else 0,
        )
