"""The caller's side of one batched request: a ``BatchHandle`` streams its text deltas.

The engine (``providers.huggingface.batching``) routes each of the manager's outputs for a request to that
request's handle; the reading thread decodes, watches for stop strings and decides why the
request ended, so the router thread stays light.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from providers import errors

DONE = object()  # delivered to a handle when its request was cancelled


class Pacing(Protocol):
    """How often a handle looks at its inbox, and how long it waits for output before failing."""

    @property
    def poll_s(self) -> float:
        """Seconds between two looks at the inbox."""

    @property
    def stall_timeout_s(self) -> float:
        """Seconds without output after which the request fails."""


class HandleOwner(Protocol):
    """What a handle needs of the engine that routes its outputs (``BatchingEngine``)."""

    @property
    def tokenizer(self) -> Any:
        """The tokenizer that decodes the request's tokens."""

    @property
    def config(self) -> Pacing:
        """The engine's pacing."""

    @property
    def eos_ids(self) -> frozenset[int]:
        """Token ids that end a request and are not part of its text."""

    def cancel(self, handle: BatchHandle) -> None:
        """Take ``handle``'s request out of the batch."""


@dataclass
class BatchResult:
    """A finished request: its text, why it ended and its token counts."""

    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)


class IncrementalDecoder:
    """Text deltas from a growing token list, never splitting a multi-byte character.

    A few tokens before the new ones are decoded with them, so that tokenizers whose decoding
    depends on the previous token (leading spaces) give the same text as one full decode.
    """

    def __init__(self, tokenizer: Any, context: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = list(context)[-5:]
        self._prefix = 0
        self._read = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    def push(self, new_ids: Sequence[int]) -> str:
        """Add tokens; return the text they complete (empty while a character is unfinished)."""
        self._ids.extend(new_ids)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]

    def flush(self) -> str:
        """The text still held back (a trailing incomplete character, as the tokenizer renders it)."""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return after[len(before) :] if len(after) > len(before) else ""


class BatchHandle:
    """One submitted request. Iterate it for text deltas; then ``result`` holds the outcome.

    Leaving the iteration early (a break, an exception, a closed generator) cancels the
    request, so a consumer that stops reading never leaves it generating in the batch.
    """

    def __init__(
        self, engine: HandleOwner, request_id: str, prompt: list[int], max_new_tokens: int, stops: list[str]
    ) -> None:
        self.request_id = request_id
        self.prompt_tokens = len(prompt)
        self.max_new_tokens = max_new_tokens
        self.result: BatchResult | None = None
        self._engine = engine
        self._stops = stops
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._decoder = IncrementalDecoder(engine.tokenizer, prompt)
        self._tokens: list[int] = []
        self._text: list[str] = []
        self._cancelled = threading.Event()

    @property
    def finished(self) -> bool:
        """Whether the request has ended (finished, failed or cancelled)."""
        return self.result is not None or self._cancelled.is_set()

    def _deliver(self, item: Any) -> None:
        self._inbox.put(item)

    def __iter__(self) -> Iterator[str]:
        try:
            yield from self._stream()
        finally:
            if self.result is None:
                self._engine.cancel(self)

    def _stream(self) -> Iterator[str]:
        config = self._engine.config
        quiet_since = time.monotonic()
        while self.result is None:
            try:
                item = self._inbox.get(timeout=config.poll_s)
            except queue.Empty:
                if self._cancelled.is_set():
                    return
                if time.monotonic() - quiet_since > config.stall_timeout_s:
                    raise errors.ProviderTimeout(f"no token for {config.stall_timeout_s:.0f} s") from None
                continue
            quiet_since = time.monotonic()
            if item is DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield from self._on_output(item)

    def _on_output(self, output: Any) -> Iterator[str]:
        if output.error is not None:
            raise errors.ServerError(f"generation failed: {output.error}")
        new = list(output.generated_tokens[len(self._tokens) :])
        eos = self._engine.eos_ids
        text_ids = [token for token in new if token not in eos]
        self._tokens.extend(new)
        delta = self._decoder.push(text_ids) if text_ids else ""
        if output.is_finished():
            delta += self._decoder.flush()
        if delta:
            self._text.append(delta)
        stopped = self._stop_string_seen(len(delta))
        if delta:
            yield delta
        if stopped:
            self._finish("stop")
            self._engine.cancel(self)
        elif output.is_finished():
            ended_on_eos = bool(self._tokens) and self._tokens[-1] in eos
            self._finish("length" if len(self._tokens) >= self.max_new_tokens and not ended_on_eos else "stop")

    def _stop_string_seen(self, delta_len: int) -> bool:
        if not self._stops or not delta_len:
            return False
        window = max(len(stop) for stop in self._stops) + delta_len
        tail = "".join(self._text)[-window:]
        return any(stop in tail for stop in self._stops)

    def _finish(self, reason: str) -> None:
        self.result = BatchResult(
            text="".join(self._text),
            finish_reason=reason,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=len(self._tokens),
            token_ids=list(self._tokens),
        )

    def collect(self) -> BatchResult:
        """Read the whole request and return its result (raises what the iteration raises)."""
        for _ in self:
            pass
        if self.result is None:
            raise errors.ServerError("the request was cancelled")
        return self.result
