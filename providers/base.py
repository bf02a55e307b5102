"""The provider contract: what the chain hands a provider and what it gets back.

Like Haystack's chat generators, a provider takes the conversation and ``generation_kwargs``
and calls ``on_chunk`` with each ``StreamingChunk`` as text arrives; it returns the finished
replies. Unlike them, it must raise only the taxonomy of ``providers.errors``: the vendor's own
exceptions are translated at the provider's boundary.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from settings.providers import ProviderConfigBase
from tasks.contract.schemas import AssistantReply, ChatMessage


@dataclass(frozen=True)
class StreamingChunk:
    """A piece of generated text, as Haystack's ``StreamingChunk``.

    ``index`` is the reply the text belongs to; ``meta`` carries whatever the provider knows
    at that point (model, finish_reason on the last chunk...).
    """

    content: str
    index: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


OnChunk = Callable[[StreamingChunk], None]


@dataclass(frozen=True)
class ProviderCall:
    """One call of a provider.

    ``deadline`` is the request's (``time.monotonic()`` based); ``wait`` sleeps but wakes early
    to raise ``Cancelled`` or ``DeadlineExceeded``, so a provider that paces itself uses it
    instead of ``time.sleep``. ``provider_attempt`` is 1 for the first call of this provider
    within the request, 2 for its first retry...
    """

    messages: Sequence[ChatMessage]
    generation_kwargs: dict[str, Any]
    stream: bool
    deadline: float
    provider_attempt: int = 1
    wait: Callable[[float], None] = time.sleep

    def time_left(self) -> float:
        """Seconds until the request's deadline."""
        return self.deadline - time.monotonic()


class ChatProvider(abc.ABC):
    """A configured provider: one ``[providers.<id>]`` entry, built once per worker process."""

    def __init__(self, provider_id: str, config: ProviderConfigBase) -> None:
        self.provider_id = provider_id
        self.config = config

    @property
    def queue(self) -> str:
        """The Celery queue whose workers may call this provider."""
        return self.config.queue

    def warm_up(self) -> None:  # noqa: B027 - optional hook, most providers need nothing
        """Prepare expensive state (load a model) before the first request."""

    @abc.abstractmethod
    def run(self, call: ProviderCall, on_chunk: OnChunk) -> list[AssistantReply]:
        """Generate the replies for ``call``, calling ``on_chunk`` with each chunk.

        Raises a ``ProviderError`` subclass on failure. Exceptions raised by ``on_chunk``
        (cancel, deadline) must propagate unchanged.
        """


def utc_now_iso() -> str:
    """The current time as an ISO 8601 string, for ``completion_start_time``."""
    return datetime.now(UTC).isoformat()
