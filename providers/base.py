"""The provider contract: what the chain hands a provider and what it gets back.

Like Haystack's chat generators, a provider takes the conversation and ``generation_kwargs``
and calls ``on_chunk`` with each ``StreamingChunk`` as text arrives; it returns the finished
replies. Unlike them, it must raise only the taxonomy of ``providers.errors``: the vendor's own
exceptions are translated at the provider's boundary.

Messages v2: a call carries the request's tools, ``tool_choice``, ``parallel_tool_calls``,
``response_format`` and ``n``; a chunk carries its choice (``index``) and either text or a
fragment of a tool call; the result holds one ``AssistantReply`` per choice, its tool calls
assembled from the fragments (``providers.replies.ReplyAssembler`` does that for every API
provider).
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from settings.providers import ProviderConfigBase
from tasks.contract.schemas import (
    AssistantReply,
    ChatMessage,
    ResponseFormat,
    ToolCallDelta,
    ToolChoice,
    ToolDefinition,
)


@dataclass(frozen=True)
class StreamingChunk:
    """A piece of generated text, or a fragment of a tool call, as Haystack's ``StreamingChunk``.

    ``index`` is the reply (the choice) the piece belongs to; ``meta`` carries whatever the
    provider knows at that point (model, finish_reason on the last chunk...). A tool-call
    fragment has empty ``content`` and ``tool_call`` set: the call's position among the
    choice's calls, its ``id`` and ``name`` on the call's first fragment, and a piece of its
    arguments' JSON text.
    """

    content: str
    index: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    tool_call: ToolCallDelta | None = None


OnChunk = Callable[[StreamingChunk], None]


@dataclass(frozen=True)
class ProviderCall:
    """One call of a provider.

    ``deadline`` is the request's (``time.monotonic()`` based); ``wait`` sleeps but wakes early
    to raise ``Cancelled`` or ``DeadlineExceeded``, so a provider that paces itself uses it
    instead of ``time.sleep``. ``provider_attempt`` is 1 for the first call of this provider
    within the request, 2 for its first retry...

    ``response_format`` and ``n`` are the request's (typed); given in ``generation_kwargs``
    instead, they are taken out of it into these fields, so ``generation_kwargs`` does not hold
    them and each provider maps them its own way (a ``response_format`` that is not Cascade's
    shape, a vendor's own, stays in ``generation_kwargs``). ``n`` is None when none is named.
    """

    messages: Sequence[ChatMessage]
    generation_kwargs: dict[str, Any]
    stream: bool
    deadline: float
    provider_attempt: int = 1
    wait: Callable[[float], None] = time.sleep
    tools: Sequence[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    n: int | None = None

    def __post_init__(self) -> None:
        kwargs = dict(self.generation_kwargs)
        # A frozen dataclass: its own normalisation goes through object.__setattr__.
        if "response_format" in kwargs:
            try:
                response_format = ResponseFormat.model_validate(kwargs["response_format"])
            except ValidationError:
                pass  # a vendor's own shape (TGI's grammar): it passes through, unchecked
            else:
                del kwargs["response_format"]
                if self.response_format is None:
                    object.__setattr__(self, "response_format", response_format)
        n = kwargs.pop("n", None)
        if self.n is None and isinstance(n, int) and not isinstance(n, bool):
            object.__setattr__(self, "n", n)
        object.__setattr__(self, "generation_kwargs", kwargs)

    @property
    def choices(self) -> int:
        """How many replies the call asks for (``n``, 1 when unset)."""
        return self.n or 1

    @property
    def offers_tools(self) -> bool:
        """True when the model may call one of the request's tools."""
        return bool(self.tools) and self.tool_choice != "none"

    def time_left(self) -> float:
        """Seconds until the request's deadline."""
        return self.deadline - time.monotonic()


class ConfiguredProvider(abc.ABC):  # noqa: B024 - a base for both kinds; each kind adds its abstract run
    """A configured provider of any kind: one ``[providers.<id>]`` entry, built once per worker
    process."""

    def __init__(self, provider_id: str, config: ProviderConfigBase) -> None:
        self.provider_id = provider_id
        self.config = config

    @property
    def queue(self) -> str:
        """The Celery queue whose workers may call this provider."""
        return self.config.queue

    def warm_up(self) -> None:  # noqa: B027 - optional hook, most providers need nothing
        """Prepare expensive state (load a model) before the first request."""


class ChatProvider(ConfiguredProvider):
    """A configured chat provider."""

    @abc.abstractmethod
    def run(self, call: ProviderCall, on_chunk: OnChunk) -> list[AssistantReply]:
        """Generate the replies for ``call``, calling ``on_chunk`` with each chunk.

        Raises a ``ProviderError`` subclass on failure. Exceptions raised by ``on_chunk``
        (cancel, deadline) must propagate unchanged.
        """


def utc_now_iso() -> str:
    """The current time as an ISO 8601 string, for ``completion_start_time``."""
    return datetime.now(UTC).isoformat()
