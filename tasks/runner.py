"""Running one validated ``cascade.chat`` request: chunks out, chain through, reply stored.

``RequestRunner`` is the chat side of ``tasks.run.Run`` (which opens the run, walks the
chain, ends it with one terminal event and one stored reply, or hands it off): it walks a
``ChainRun`` of chat providers, turns its chunks into ``chunk`` events, applies the deadline
and cancel to them, and builds the ``ChatReply``.
"""

from __future__ import annotations

import time
from typing import Any

from providers import errors
from providers.base import StreamingChunk
from providers.chain import ChainOutcome, ChainRun
from tasks.contract.schemas import ChainMeta, ChatReply, ChatRequest, ErrorInfo, HandOff
from tasks.run import WAIT_SLICE_S as _WAIT_SLICE_S
from tasks.run import Run, TaskContext, checked_handoff, task_message

__all__ = ["RequestRunner", "TaskContext", "checked_handoff", "task_message"]


class RequestRunner(Run[ChatRequest, ChatReply]):
    """Runs one chat request (or its continuation after a hand-off) on this worker; see
    ``tasks.run.Run`` for its arguments."""

    def _walk(self, provider_ids: list[str], fields: dict[str, Any]) -> ChainRun:
        return ChainRun(
            providers=self.runtime.providers.chain(provider_ids),
            messages=self.request.conversation,
            generation_kwargs=self.request.generation_kwargs.model_dump(exclude_none=True),
            stream=self.request.stream,
            **fields,
        )

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
        """Publish a chunk (when streaming) and stop on cancel or deadline."""
        now = time.monotonic()
        if now >= self.deadline:
            raise errors.DeadlineExceeded("the request's deadline passed")
        if self.first_chunk_at is None:
            self.first_chunk_at = time.time()
        if self.request.stream and chunk.content:
            cancelled = self.session.emit("chunk", delta=chunk.content, provider=provider_id, attempt=attempt)
        elif now - self._last_cancel_check >= _WAIT_SLICE_S:
            self._last_cancel_check = now
            cancelled = self.session.cancel_requested()
        else:
            cancelled = False
        if cancelled:
            raise errors.Cancelled("cancelled by the producer")
