"""Running one validated ``cascade.chat`` request: chunks out, chain through, reply stored.

``RequestRunner`` is the chat side of ``tasks.run.Run`` (which opens the run, walks the
chain, ends it with one terminal event and one stored reply, or hands it off): it walks a
``ChainRun`` of chat providers with the request's tools, turns its chunks into ``chunk``
events (text or tool-call fragments, each under its choice's ``index``), applies the deadline
and cancel to them, and builds the ``ChatReply``. A request that asks for
``hallucination_score`` has the winner's answer scored by that provider before the reply is
stored (``providers.scoring``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from providers import errors
from providers.base import ChatProvider, StreamingChunk
from providers.chain import ChainOutcome, ChainRun
from providers.scoring.sampler import ScoringOutcome, score_answer, scoring_config, with_scoring
from tasks.contract.schemas import ChainMeta, ChatReply, ChatRequest, ErrorInfo, HandOff
from tasks.run import WAIT_SLICE_S as _WAIT_SLICE_S
from tasks.run import Run, TaskContext, checked_handoff, task_message

__all__ = ["RequestRunner", "TaskContext", "checked_handoff", "task_message"]

logger = logging.getLogger(__name__)


class RequestRunner(Run[ChatRequest, ChatReply]):
    """Runs one chat request (or its continuation after a hand-off) on this worker; see
    ``tasks.run.Run`` for its arguments."""

    def _walk(self, provider_ids: list[str], fields: dict[str, Any]) -> ChainRun:
        return ChainRun(
            providers=self.runtime.providers.chain(provider_ids),
            messages=self.request.conversation,
            generation_kwargs=self.request.generation_kwargs.model_dump(exclude_none=True),
            stream=self.request.stream,
            tools=self.request.tools,
            tool_choice=self.request.tool_choice,
            parallel_tool_calls=self.request.parallel_tool_calls,
            **fields,
        )

    def _completed(self, outcome: ChainOutcome[Any]) -> ChainOutcome[Any]:
        if not isinstance(outcome.provider, ChatProvider) or self.request.hallucination_score is None:
            return outcome
        return self._scored(outcome, outcome.provider)

    def _scored(self, outcome: ChainOutcome[Any], provider: ChatProvider) -> ChainOutcome[Any]:
        """The winner's replies with their hallucination risk score (``providers.scoring``): the
        decision calls go to the winning provider directly, never to the listener (nothing of
        them is published), within the request's deadline. Scoring that fails leaves the
        answer standing and says why in ``hallucination_error``."""
        answer = [reply.to_message() for reply in outcome.replies[:1]]
        try:
            config = scoring_config(self.request.hallucination_score)
            messages = [*self.request.conversation, *answer]
            bound = self.runtime.settings.scoring_max_parallel
            scoring = score_answer(provider, messages, config, deadline=self.deadline, max_parallel=bound)
        except Exception as exc:
            logger.exception("request %s: scoring its answer failed inside the worker", self.request_id)
            scoring = ScoringOutcome(error=f"scoring failed inside the worker ({type(exc).__name__})")
        logger.info("request %s scored with %d decision call(s)", self.request_id, scoring.calls)
        return dataclasses.replace(outcome, results=with_scoring(outcome.replies, scoring))

    def _reply(
        self, status: str, outcome: ChainOutcome[Any] | None, meta: ChainMeta, error: ErrorInfo | None
    ) -> ChatReply:
        return ChatReply(
            request_id=self.request_id,
            status=status,  # type: ignore[arg-type]
            replies=outcome.replies if outcome else [],
            meta=meta,
            error=error,
            metadata=self.request.metadata,
        )

    def _finished(self, reply: ChatReply) -> None:
        self._notify(lambda observer: observer.request_finished(self.request, reply))

    def _handed_off(self, state: HandOff, queue: str) -> None:
        self._notify(lambda observer: observer.request_handed_off(self.request, state, queue))

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
