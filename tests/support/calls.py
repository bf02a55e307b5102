"""What provider and chain tests hand a provider, and what records its answers.

``make_call`` builds a ``ProviderCall`` of a short conversation; ``ChunkCollector`` is an
``on_chunk`` that keeps the chunks; ``ChainRecorder`` is a chain listener that keeps chunks and
failed attempts; ``run_failing`` runs a call that must fail; ``provider_factory`` builds providers
of one kind from their config fields.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import pytest

from providers import errors
from providers.base import ChatProvider, ProviderCall, StreamingChunk
from providers.registry import build_provider
from settings import ProviderConfigBase
from tasks.contract.schemas import AttemptRecord, ChatMessage

MESSAGES = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Capital of France?")]

P = TypeVar("P", bound=ChatProvider)


def make_call(
    *,
    messages: Sequence[ChatMessage] = MESSAGES,
    stream: bool = True,
    deadline_s: float = 10.0,
    attempt: int = 1,
    wait: Callable[[float], None] = time.sleep,
    **generation_kwargs: Any,
) -> ProviderCall:
    """A call of ``messages`` due in ``deadline_s``, with ``generation_kwargs``."""
    return ProviderCall(
        messages=messages,
        generation_kwargs=generation_kwargs,
        stream=stream,
        deadline=time.monotonic() + deadline_s,
        provider_attempt=attempt,
        wait=wait,
    )


class ChunkCollector:
    """An ``on_chunk`` that keeps the chunks."""

    def __init__(self) -> None:
        self.chunks: list[StreamingChunk] = []

    def __call__(self, chunk: StreamingChunk) -> None:
        self.chunks.append(chunk)

    @property
    def text(self) -> str:
        """The streamed text, all choices together."""
        return "".join(chunk.content for chunk in self.chunks)


class ChainRecorder:
    """A chain listener that records chunks and failed attempts; it raises ``stop`` on the
    ``stop_on_chunk``-th chunk when that is set."""

    def __init__(self, stop_on_chunk: int | None = None, stop: type[errors.RequestStopped] = errors.Cancelled) -> None:
        self.chunks: list[tuple[str, int, str]] = []
        self.failed: list[AttemptRecord] = []
        self._stop_on_chunk = stop_on_chunk
        self._stop = stop

    def on_chunk(self, provider_id: str, attempt: int, chunk: StreamingChunk) -> None:
        self.chunks.append((provider_id, attempt, chunk.content))
        if self._stop_on_chunk is not None and len(self.chunks) >= self._stop_on_chunk:
            raise self._stop("told to stop")

    def on_attempt_failed(self, record: AttemptRecord) -> None:
        self.failed.append(record)

    def text_of(self, attempt: int) -> str:
        """The text streamed by ``attempt``."""
        return "".join(content for _provider, number, content in self.chunks if number == attempt)


def run_failing(provider: ChatProvider, **call_kwargs: Any) -> tuple[BaseException, ChunkCollector]:
    """Run a call (``make_call(**call_kwargs)``) that must fail; the error and the chunks emitted before it."""
    collect = ChunkCollector()
    with pytest.raises(errors.CascadeError) as caught:
        provider.run(make_call(**call_kwargs), collect)
    return caught.value, collect


def provider_factory(
    provider_id: str, config_class: type[ProviderConfigBase], provider_class: type[P], **defaults: Any
) -> Callable[..., P]:
    """Build ``provider_class`` providers named ``provider_id`` from ``config_class(**defaults,
    **fields)`` (``fields`` win)."""

    def build(**fields: Any) -> P:
        provider = build_provider(provider_id, config_class(**{**defaults, **fields}))
        assert isinstance(provider, provider_class)
        return provider

    return build
