"""Running one validated request: events out, chain through, reply stored.

``RequestRunner`` drives the chain for one run: it turns chain callbacks into ``chunk`` and
``fallback`` events, applies the deadline and cancel, and ends with exactly one terminal event
and one stored reply — or, when the chain continues on another queue, hands the request off
with its history. Everything it writes or reads in Redis goes through the run's
``worker.state.session.RunSession``. A request that asks for ``hallucination_score`` has the
winner's answer scored by that provider before the reply is stored (``providers.scoring``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from celery.exceptions import SoftTimeLimitExceeded

from providers import errors
from providers.base import StreamingChunk
from providers.chain import ChainOutcome, ChainRun, CooldownGate
from providers.scoring.sampler import ScoringOutcome, score_answer, scoring_config, with_scoring
from tasks.contract.schemas import (
    DEFAULT_QUEUE,
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

logger = logging.getLogger(__name__)

# How often a wait (first-chunk delay, retry backoff) looks for a cancel.
_WAIT_SLICE_S = 0.05


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


def task_message(request: ChatRequest, handoff: HandOff | None = None) -> dict[str, Any]:
    """The keyword arguments of a ``cascade.chat`` message for ``request`` (and its hand-off
    state). Raises ValueError for a request that cannot be written as JSON."""
    message: dict[str, Any] = {"request": json.loads(request.model_dump_json(exclude_none=True))}
    if handoff is not None:
        message["handoff"] = handoff.model_dump(mode="json")
    return message


class RequestRunner:
    """Runs one request (or its continuation after a hand-off) on this worker.

    ``session`` is the run's state in Redis; without one, a session of ``runtime`` is built,
    handing off through ``sender`` (none: the chain never leaves this worker). ``message`` is
    the task's keyword arguments, recorded to resend the request if this worker dies (built
    from the request when not given)."""

    def __init__(
        self,
        runtime: WorkerRuntime,
        request: ChatRequest,
        context: TaskContext,
        *,
        handoff: HandOff | None = None,
        session: RunSession | None = None,
        sender: TaskSender | None = None,
        message: dict[str, Any] | None = None,
    ) -> None:
        self.runtime = runtime
        self.request = request
        self.context = context
        self.handoff = handoff
        self.request_id: str = request.request_id or ""
        self.session = session or RunSession.of(runtime, self.request_id, sender=sender)
        self._message = message
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

    def run(self) -> ChatReply | HandOff | None:
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
            stored = ChatReply.model_validate_json(opening.stored_reply) if opening.stored_reply else None
            if stored is not None:
                logger.info("request %s already answered (%s); not running it again", self.request_id, stored.status)
                return stored
            return self._run(opening.started, opening.cancelled)

    def _run(self, started: bool, cancelled: bool) -> ChatReply | HandOff:
        chain_name = self.request.chain
        provider_ids = self.runtime.settings.chains[chain_name]
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
            logger.warning("request %s: resuming a run that lost its worker", self.request_id)
        run = ChainRun(
            providers=self.runtime.providers.chain(provider_ids),
            messages=self.request.conversation,
            generation_kwargs=self.request.generation_kwargs.model_dump(exclude_none=True),
            deadline=self.deadline,
            listener=self,
            stream=self.request.stream,
            worker=self.runtime.worker_name,
            wait=self._wait,
            cooldowns=self._cooldowns,
            start_index=start_index,
            attempts=attempts,
            local_queues=self.context.local_queues if self.session.can_hand_off else None,
            tools=self.request.tools,
            tool_choice=self.request.tool_choice,
            parallel_tool_calls=self.request.parallel_tool_calls,
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
            outcome = run.execute()
            if outcome.provider is not None and self.request.hallucination_score is not None:
                outcome = self._scored(outcome)
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
            logger.warning("request %s lost its Redis connection; it will be sent again", self.request_id)
            raise
        except Exception as exc:  # a bug must still end the stream and store a reply
            logger.exception("request %s failed inside the worker", self.request_id)
            error = ErrorInfo(type="internal_error", message=f"internal error ({type(exc).__name__})")
            return self._finish("error", run, None, error)
        if outcome.handoff_index is not None:
            return self._hand_off(run, outcome.handoff_index)
        if outcome.error is not None:
            return self._finish("error", run, outcome, outcome.error)
        return self._finish("done", run, outcome, None)

    # --- ChainListener ------------------------------------------------------------------

    def on_chunk(self, provider_id: str, attempt: int, chunk: StreamingChunk) -> None:
        """Publish a chunk (when streaming) under its choice's ``index``: its text as ``delta``,
        or its tool-call fragment as ``tool_call``; stop on cancel or deadline. Any chunk, a
        tool fragment too, is the first token of the time-to-first-token."""
        now = time.monotonic()
        if now >= self.deadline:
            raise errors.DeadlineExceeded("the request's deadline passed")
        if self.first_chunk_at is None:
            self.first_chunk_at = time.time()
        events = self._chunk_events(chunk) if self.request.stream else []
        cancelled = False
        for fields in events:
            cancelled = self.session.emit("chunk", provider=provider_id, attempt=attempt, **fields) or cancelled
        if not events and now - self._last_cancel_check >= _WAIT_SLICE_S:
            self._last_cancel_check = now
            cancelled = self.session.cancel_requested()
        if cancelled:
            raise errors.Cancelled("cancelled by the producer")

    @staticmethod
    def _chunk_events(chunk: StreamingChunk) -> list[dict[str, Any]]:
        """The ``chunk`` events of a chunk: its text, its tool-call fragment (a chunk has one of
        them; an empty one has none), each under the choice's ``index``."""
        events: list[dict[str, Any]] = []
        if chunk.content:
            events.append({"index": chunk.index, "delta": chunk.content})
        if chunk.tool_call is not None:
            events.append({"index": chunk.index, "tool_call": chunk.tool_call.model_dump(exclude_none=True)})
        return events

    def on_attempt_failed(self, record: AttemptRecord) -> None:
        """Publish a ``fallback`` event: subscribers discard the deltas of that attempt."""
        logger.warning(
            "request %s: %s attempt %d failed: %s", self.request_id, record.provider, record.attempt, record.error_type
        )
        cancelled = self.session.emit(
            "fallback", provider=record.provider, attempt=record.attempt, error_type=record.error_type
        )
        if cancelled:
            raise errors.Cancelled("cancelled by the producer")

    # --- helpers --------------------------------------------------------------------------

    def _scored(self, outcome: ChainOutcome) -> ChainOutcome:
        """The winner's replies with their hallucination risk score (``providers.scoring``): the
        decision calls go to the winning provider directly, never to the listener (nothing of
        them is published), within the request's deadline. Scoring that fails leaves the
        answer standing and says why in ``hallucination_error``."""
        assert outcome.provider is not None
        answer = [reply.to_message() for reply in outcome.replies[:1]]
        try:
            config = scoring_config(self.request.hallucination_score)
            messages = [*self.request.conversation, *answer]
            bound = self.runtime.settings.scoring_max_parallel
            scoring = score_answer(outcome.provider, messages, config, deadline=self.deadline, max_parallel=bound)
        except Exception as exc:  # a bug in scoring must not cost the answer
            logger.exception("request %s: scoring its answer failed inside the worker", self.request_id)
            scoring = ScoringOutcome(error=f"scoring failed inside the worker ({type(exc).__name__})")
        logger.info("request %s scored with %d decision call(s)", self.request_id, scoring.calls)
        return dataclasses.replace(outcome, replies=with_scoring(outcome.replies, scoring))

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
            time.sleep(min(_WAIT_SLICE_S, until - now, self.deadline - now))
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
            except Exception:
                logger.exception("request observer %r failed", observer)

    def _hand_off(self, run: ChainRun, index: int) -> HandOff:
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
        logger.info("request %s handed off to queue %s for %s", self.request_id, queue, provider_id)
        self._notify(lambda observer: observer.request_handed_off(self.request, state, queue))
        return state

    def _finish(
        self, event_type: str, run: ChainRun, outcome: ChainOutcome | None, error: ErrorInfo | None
    ) -> ChatReply:
        status = {"done": "succeeded", "cancelled": "cancelled"}.get(event_type, "failed")
        reply = ChatReply(
            request_id=self.request_id,
            status=status,  # type: ignore[arg-type]
            replies=outcome.replies if outcome else [],
            meta=self._meta(run, outcome),
            error=error,
            metadata=self.request.metadata,
        )
        if not self.session.finish(event_type, reply, error=error):
            stored = self.session.stored_reply()
            logger.warning("request %s was answered meanwhile; keeping that reply", self.request_id)
            return stored or reply
        self._notify(lambda observer: observer.request_finished(self.request, reply))
        logger.info(
            "request %s %s via %s after %d attempt(s)",
            self.request_id,
            status,
            reply.meta.provider,
            reply.meta.total_attempts,
        )
        return reply

    def _meta(self, run: ChainRun, outcome: ChainOutcome | None) -> ChainMeta:
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
