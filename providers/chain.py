"""The fallback chain: try providers in order, retrying transient failures, until one answers.

The semantics follow DESIGN.md's table:

- ``TransientError`` before any chunk: retry the same provider with exponential backoff and
  jitter (tenacity), honouring Retry-After, bounded by ``max_retries`` and the deadline;
  then fall through to the next provider.
- ``FatalProviderError``: fall through at once.
- A failure after chunks were streamed: the listener is told (a ``fallback`` event), and the
  next provider starts from scratch.
- ``RequestStopped`` (deadline, time limit, cancel) and anything outside the taxonomy: the
  chain stops and the exception propagates; it is never a reason to fall back.
- A provider in cooldown is skipped and the skip recorded.
- A provider that lacks what the request needs (tools, images, a JSON schema, ``n`` > 1:
  ``providers.requirements``) is skipped (``skipped``, ``unsupported``), never counted as a
  failure; when no provider of the chain can take the request, the run ends ``unsupported``.
- An answer that fails the request's ``response_format`` (``InvalidOutput``) is a failed
  attempt: the listener is told (its chunks are void), no retry, the next provider goes on.

Reply meta mirrors Haystack's ``FallbackChatGenerator`` keys, with ``total_attempts``
counting every call (retries included) and ``failed_chat_generators`` naming provider ids.

``ChainWalk`` holds all of that for any kind of provider; what one attempt does is its
subclass's: ``ChainRun`` calls a chat provider (chunks to ``ChainListener.on_chunk``),
``providers.images.ImageChainRun`` an image provider (images to its listener). What a
provider streams before it fails - chunks or images - counts the same: the attempt is then
never retried.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt
from tenacity.stop import stop_base

from providers import errors
from providers.base import ChatProvider, ProviderCall, StreamingChunk
from providers.requirements import OutputCheck, needs_of
from settings.providers import ProviderConfigBase
from tasks.contract.schemas import AssistantReply, AttemptRecord, ChatMessage, ErrorInfo, ToolChoice, ToolDefinition


class stop_when(stop_base):
    """A tenacity stop strategy from a predicate."""

    def __init__(self, predicate: Callable[[RetryCallState], bool]) -> None:
        self._predicate = predicate

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self._predicate(retry_state)


class ChainMember(Protocol):
    """What the chain reads of a provider, of whatever kind: its id, its entry and its queue."""

    provider_id: str
    config: ProviderConfigBase

    @property
    def queue(self) -> str:
        """The Celery queue whose workers may call the provider."""


P = TypeVar("P", bound=ChainMember)
T = TypeVar("T")


class FailureListener(Protocol):
    """Told of each failed attempt (the task turns it into a ``fallback`` event)."""

    def on_attempt_failed(self, record: AttemptRecord) -> None:
        """An attempt failed; what it streamed, if anything, is void."""


class ChainListener(FailureListener, Protocol):
    """Receives what happens during a chat run (the task turns it into stream events)."""

    def on_chunk(self, provider_id: str, attempt: int, chunk: StreamingChunk) -> None:
        """A chunk of ``attempt`` for choice ``chunk.index``: text (``chunk.content``) or a
        tool-call fragment (``chunk.tool_call``); may raise ``Cancelled`` or ``DeadlineExceeded``."""


class CooldownGate(Protocol):
    """Shared memory of which providers failed too often lately."""

    def is_cooling_down(self, provider: ChainMember) -> bool:
        """True while ``provider`` must be skipped."""

    def record_failure(self, provider: ChainMember) -> None:
        """Count one failure of ``provider`` (which may start its cooldown)."""


@dataclass
class ChainOutcome(Generic[T]):
    """The result of a chain run that ended without being stopped: what the winning provider
    returned (``results``: a chat run's replies, an image run's images), or the error."""

    results: list[T]
    succeeded_index: int | None
    provider: ChainMember | None
    error: ErrorInfo | None
    handoff_index: int | None = None

    @property
    def replies(self) -> list[T]:
        """A chat run's name for ``results``."""
        return self.results


@dataclass(kw_only=True)
class ChainWalk(Generic[P, T]):
    """One request's walk down a chain of providers of one kind; ``attempts`` stays readable if
    the run is stopped. A subclass says what one attempt is (``_attempt``), what a provider
    must offer to be tried (``_lacking``) and what makes a whole answer unusable (``_check``).

    ``start_index`` and ``attempts`` let a run resume a chain (after a hand-off to another
    queue) with the history of the attempts made so far.
    """

    providers: Sequence[P]
    deadline: float
    listener: FailureListener
    worker: str | None = None
    wait: Callable[[float], None] = time.sleep
    cooldowns: CooldownGate | None = None
    start_index: int = 0
    attempts: list[AttemptRecord] = field(default_factory=list)
    local_queues: frozenset[str] | None = None
    rng: random.Random = field(default_factory=random.Random)

    # --- what a kind of provider decides ------------------------------------------------

    def _attempt(self, provider: P, attempt: int, provider_attempt: int, emitted: Callable[[], None]) -> list[T]:
        """Call ``provider`` once (attempt number ``attempt``, its ``provider_attempt``-th call
        in this request), calling ``emitted`` before each output subscribers will see."""
        raise NotImplementedError

    def _lacking(self, provider: P) -> list[str]:
        """What the request needs that ``provider`` lacks (it is then skipped)."""
        return []

    def _check(self, provider_id: str, results: list[T]) -> None:
        """Raise ``InvalidOutput`` if ``results`` came whole but are unusable."""

    # --- the walk -----------------------------------------------------------------------

    def execute(self) -> ChainOutcome[T]:
        """Walk the chain from ``start_index``; raise ``RequestStopped`` when told to stop.

        With ``local_queues`` set, the walk ends at the first provider served on another
        queue: the outcome's ``handoff_index`` says where the next worker must resume.
        """
        for index in range(self.start_index, len(self.providers)):
            provider = self.providers[index]
            if time.monotonic() >= self.deadline:
                raise errors.DeadlineExceeded("the request's deadline passed")
            lacking = self._lacking(provider)
            if lacking:
                reason = errors.Unsupported(f"{provider.provider_id} does not take {', '.join(lacking)}")
                self._record(provider, index, "skipped", reason, 0.0, 0)
                continue
            if self.cooldowns is not None and self.cooldowns.is_cooling_down(provider):
                self._record(provider, index, "skipped", errors.ProviderUnavailable("in cooldown"), 0.0, 0)
                continue
            if self.local_queues is not None and provider.queue not in self.local_queues:
                return ChainOutcome(results=[], succeeded_index=None, provider=None, error=None, handoff_index=index)
            try:
                results = self._with_retries(provider, index)
            except errors.ProviderError:
                continue
            return ChainOutcome(results=results, succeeded_index=index, provider=provider, error=None)
        return ChainOutcome(results=[], succeeded_index=None, provider=None, error=self._final_error())

    def meta(self, outcome: ChainOutcome[T] | None = None) -> dict[str, Any]:
        """The chain part of the reply meta (Haystack's four keys, provider, attempts)."""
        winner = outcome.provider if outcome else None
        # As in Haystack, the winner is never listed, even if it needed a retry.
        failed: list[str] = []
        for record in self.attempts:
            if record.outcome == "failed" and record.provider not in failed:
                if winner is None or record.provider != winner.provider_id:
                    failed.append(record.provider)
        return {
            "successful_chat_generator_index": outcome.succeeded_index if outcome else None,
            "successful_chat_generator_class": _class_name(winner) if winner else None,
            "total_attempts": sum(1 for r in self.attempts if r.outcome != "skipped"),
            "failed_chat_generators": failed,
            "provider": winner.provider_id if winner else None,
            "attempts": self.attempts,
        }

    # --- one provider -------------------------------------------------------------------

    def _with_retries(self, provider: P, index: int) -> list[T]:
        cfg = provider.config
        retrying = Retrying(
            retry=retry_if_exception(lambda exc: self._worth_retrying(exc, cfg.retry_after_max_s)),
            stop=stop_after_attempt(1 + cfg.max_retries) | stop_when(self._stop_if_past_deadline),
            wait=self._backoff(cfg.backoff_initial_s, cfg.backoff_max_s),
            sleep=self.wait,
            reraise=True,
        )
        provider_attempt = 0

        def call_once() -> list[T]:
            nonlocal provider_attempt
            provider_attempt += 1
            return self._call_once(provider, index, provider_attempt)

        try:
            result: list[T] = retrying(call_once)
        finally:
            release_retrying(retrying)
        return result

    def _call_once(self, provider: P, index: int, provider_attempt: int) -> list[T]:
        attempt = self._next_attempt()
        outputs = 0

        def emitted() -> None:
            nonlocal outputs
            outputs += 1

        started = time.monotonic()
        try:
            results = self._attempt(provider, attempt, provider_attempt, emitted)
        except errors.ProviderError as exc:
            failure = exc
            if outputs and not isinstance(exc, errors.StreamInterrupted):
                # Retrying would replay what subscribers already saw: treat as a cut stream.
                failure = errors.StreamInterrupted.after(exc, outputs)
            record = self._record(provider, index, "failed", failure, started, outputs)
            if self.cooldowns is not None and errors.counts_against_provider(failure):
                self.cooldowns.record_failure(provider)
            self.listener.on_attempt_failed(record)
            raise failure from exc
        except BaseException as exc:
            self._record(provider, index, "stopped", exc, started, outputs)
            raise
        try:
            self._check(provider.provider_id, results)
        except errors.InvalidOutput as invalid:
            # The answer came whole but is unusable: what it streamed is void; another call of the
            # same model is no likelier to comply than the next provider.
            self.listener.on_attempt_failed(self._record(provider, index, "failed", invalid, started, outputs))
            raise
        self._record(provider, index, "succeeded", None, started, outputs)
        return results

    def _record(
        self,
        provider: ChainMember,
        index: int,
        outcome: str,
        exc: BaseException | None,
        started: float,
        chunks: int,
    ) -> AttemptRecord:
        record = AttemptRecord(
            provider=provider.provider_id,
            index=index,
            attempt=self._next_attempt(),
            outcome=outcome,  # type: ignore[arg-type]
            error_type=errors.error_code(exc) if exc is not None else None,
            error_message=exc.message if isinstance(exc, errors.CascadeError) else None,
            duration_ms=round((time.monotonic() - started) * 1000, 3) if started else 0.0,
            chunks=chunks,
            worker=self.worker,
        )
        self.attempts.append(record)
        return record

    def _next_attempt(self) -> int:
        """Attempt numbers only grow, also past those of a run this one resumes."""
        return max((record.attempt for record in self.attempts), default=0) + 1

    # --- retry policy -------------------------------------------------------------------

    @staticmethod
    def _worth_retrying(exc: BaseException, retry_after_max_s: float) -> bool:
        if not isinstance(exc, errors.TransientError):
            return False
        retry_after = getattr(exc, "retry_after_s", None)
        return retry_after is None or retry_after <= retry_after_max_s

    def _stop_if_past_deadline(self, state: RetryCallState) -> bool:
        return time.monotonic() + (state.upcoming_sleep or 0.0) >= self.deadline

    def _backoff(self, initial: float, maximum: float) -> Callable[[RetryCallState], float]:
        """Full-jitter exponential backoff, never shorter than the provider's Retry-After."""

        def wait(state: RetryCallState) -> float:
            ceiling = min(maximum, initial * 2 ** (state.attempt_number - 1))
            delay = self.rng.uniform(ceiling / 2, ceiling)
            exc = state.outcome.exception() if state.outcome else None
            retry_after = getattr(exc, "retry_after_s", None)
            return max(delay, retry_after or 0.0)

        return wait

    def _final_error(self) -> ErrorInfo:
        tried = [r for r in self.attempts if r.outcome != "skipped"]
        unsupported = [r for r in self.attempts if r.error_type == errors.Unsupported.code]
        if not tried and unsupported and len(unsupported) == len(self.attempts):
            reasons = "; ".join(r.error_message or r.provider for r in unsupported)
            return ErrorInfo(type=errors.Unsupported.code, message=f"no provider of the chain can take it ({reasons})")
        if not tried:
            message = "every provider of the chain is cooling down" + (" or lacks what it needs" if unsupported else "")
            return ErrorInfo(type="all_providers_failed", message=message)
        summary = "; ".join(f"{r.provider}: {r.error_type}" for r in self.attempts)
        message = f"all {len(tried)} attempt(s) failed ({summary})"
        if all(r.error_type == errors.BadProviderRequest.code for r in tried):
            # Every provider refused the request itself (a parameter its model does not take):
            # their own words name the field, which the summary alone would not.
            message += ": " + "; ".join(dict.fromkeys(r.error_message or r.provider for r in tried))
        return ErrorInfo(type="all_providers_failed", message=message)


@dataclass(kw_only=True)
class ChainRun(ChainWalk[ChatProvider, AssistantReply]):
    """A chat request's walk down a chain (see ``ChainWalk``): each attempt calls a chat
    provider, its chunks going to ``listener.on_chunk``.

    ``tools``, ``tool_choice`` and ``parallel_tool_calls`` are the request's; its
    ``response_format`` and ``n`` come in ``generation_kwargs`` (``ProviderCall`` takes them
    out into fields of its own). A provider that lacks what the request needs
    (``providers.requirements``) is skipped; an answer that fails the ``response_format`` is
    an ``InvalidOutput``.
    """

    messages: Sequence[ChatMessage]
    generation_kwargs: dict[str, Any]
    listener: ChainListener
    stream: bool = True
    tools: Sequence[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def __post_init__(self) -> None:
        self._template = self._provider_call(provider_attempt=1)
        self._needs = needs_of(self._template)
        self._output_check = OutputCheck(self._template.response_format)

    def _attempt(
        self, provider: ChatProvider, attempt: int, provider_attempt: int, emitted: Callable[[], None]
    ) -> list[AssistantReply]:
        def on_chunk(chunk: StreamingChunk) -> None:
            emitted()
            self.listener.on_chunk(provider.provider_id, attempt, chunk)

        return provider.run(self._provider_call(provider_attempt), on_chunk)

    def _lacking(self, provider: ChatProvider) -> list[str]:
        return self._needs.missing(provider.config.capabilities())

    def _check(self, provider_id: str, results: list[AssistantReply]) -> None:
        self._output_check.check(provider_id, results)

    def _provider_call(self, provider_attempt: int) -> ProviderCall:
        return ProviderCall(
            messages=self.messages,
            generation_kwargs=self.generation_kwargs,
            stream=self.stream,
            deadline=self.deadline,
            provider_attempt=provider_attempt,
            wait=self.wait,
            tools=self.tools,
            tool_choice=self.tool_choice,
            parallel_tool_calls=self.parallel_tool_calls,
        )


def _class_name(provider: ChainMember) -> str:
    """The provider's class name, seen through a lazy handle."""
    return str(getattr(provider, "provider_class_name", type(provider).__name__))


def release_retrying(retrying: Retrying) -> None:
    """Break the reference cycle a ``Retrying`` keeps after a call (its iteration state lists
    bound methods of itself), which holds the call's closure and through it the chain run, its
    listener and the request: with it broken they are freed as the call returns, instead of by
    the garbage collector, whose passes then fall inside later requests."""
    retrying.iter_state.reset()
