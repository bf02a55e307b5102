"""Wire schemas: what producers send and what subscribers and reply readers get back.

These pydantic models are the public contract of ``cascade.chat`` (see DESIGN.md). The JSON
Schema files in ``schemas/`` are generated from them (``python -m tasks.schema_export``) and a
test fails when the two drift apart. This module imports nothing else of Cascade's, so every
layer may use it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = 1

# The Celery task every producer sends, whatever its language.
TASK_NAME = "cascade.chat"
# Optional message header (unix time) a producer may set so replies report time spent queued.
SUBMITTED_AT_HEADER = "cascade_submitted_at"
# Message header Cascade's own senders set to the request id, so a reaper scanning a queue for
# a request reads it without decoding each message's body (worker.pending).
REQUEST_ID_HEADER = "cascade_request_id"

# The alphabet of request ids: they become part of Redis keys, so no spaces, colons, braces
# or glob characters, and a bounded length.
REQUEST_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"

# Hard caps of the schema itself; workers apply their own (smaller, configurable) limits too.
MAX_MESSAGES = 1024
MAX_CONTENT_CHARS = 1_000_000

Role = Literal["system", "user", "assistant"]
RequestId = Annotated[str, Field(pattern=REQUEST_ID_PATTERN)]


class ChatMessage(BaseModel):
    """One message of the conversation."""

    model_config = ConfigDict(extra="forbid")

    role: Role
    content: str = Field(max_length=MAX_CONTENT_CHARS)


class GenerationKwargs(BaseModel):
    """Sampling parameters; each provider maps them to its own API and ignores what it lacks.

    Unknown keys are kept and passed through to the provider's own allow-list, but keys that
    would change where or as whom a request is sent are refused here.
    """

    model_config = ConfigDict(extra="allow")

    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: list[str] | None = Field(default=None, max_length=16)
    seed: int | None = None

    @model_validator(mode="after")
    def _no_routing_overrides(self) -> GenerationKwargs:
        forbidden = {
            "api_key",
            "api_base",
            "api_base_url",
            "base_url",
            "azure_endpoint",
            "endpoint",
            "url",
            "headers",
            "extra_headers",
            "default_headers",
            "extra_body",
            "extra_query",
            "model",
            "organization",
            "token",
            "api_version",
            "azure_deployment",
            "deployment",
            "provider",
        }
        bad = sorted(forbidden & set(self.model_extra or {}))
        if bad:
            raise ValueError(f"generation_kwargs may not set {', '.join(bad)}")
        return self


class ChatRequest(BaseModel):
    """A chat request as enqueued by a producer (task ``cascade.chat``, keyword ``request``).

    Either ``messages`` or the ``prompt`` shorthand (with an optional ``system_prompt``) must
    be given; after validation ``messages`` always holds the conversation.
    """

    model_config = ConfigDict(extra="forbid")

    request_id: RequestId | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=MAX_MESSAGES)
    prompt: str | None = Field(default=None, max_length=MAX_CONTENT_CHARS)
    system_prompt: str | None = Field(default=None, max_length=MAX_CONTENT_CHARS)
    chain: str = Field(default="default", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    generation_kwargs: GenerationKwargs = Field(default_factory=GenerationKwargs)
    stream: bool = True
    timeout_s: float | None = Field(default=None, gt=0, le=86_400)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _messages_or_prompt(self) -> ChatRequest:
        if self.messages is not None and (self.prompt is not None or self.system_prompt is not None):
            raise ValueError("give either messages or prompt/system_prompt, not both")
        if self.messages is None:
            if self.prompt is None:
                raise ValueError("one of messages or prompt is required")
            messages = []
            if self.system_prompt is not None:
                messages.append(ChatMessage(role="system", content=self.system_prompt))
            messages.append(ChatMessage(role="user", content=self.prompt))
            self.messages = messages
            self.prompt = None
            self.system_prompt = None
        if len(self.metadata) > 64:
            raise ValueError("metadata may hold at most 64 keys")
        return self

    @property
    def conversation(self) -> list[ChatMessage]:
        """The messages, never ``None`` after validation."""
        assert self.messages is not None
        return self.messages


class Usage(BaseModel):
    """Token counts of one reply."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ReplyMeta(BaseModel):
    """Per-reply meta, with Haystack's keys."""

    model_config = ConfigDict(extra="allow")

    model: str
    index: int = 0
    finish_reason: str | None = None
    usage: Usage = Field(default_factory=Usage)
    completion_start_time: str | None = None


class AssistantReply(BaseModel):
    """One generated reply."""

    role: Literal["assistant"] = "assistant"
    content: str
    meta: ReplyMeta


AttemptOutcome = Literal["succeeded", "failed", "skipped", "stopped"]


class AttemptRecord(BaseModel):
    """One call of one provider (or one skip of it), in the order they happened."""

    provider: str
    index: int = Field(description="position of the provider in the chain")
    attempt: int = Field(description="1-based number of this call within the request")
    outcome: AttemptOutcome
    error_type: str | None = None
    error_message: str | None = None
    duration_ms: float = 0.0
    chunks: int = 0
    worker: str | None = None


class Timings(BaseModel):
    """Where the time went, in milliseconds."""

    queued_ms: float | None = None
    ttft_ms: float | None = None
    total_ms: float | None = None


class ChainMeta(BaseModel):
    """The reply's ``meta``: Haystack FallbackChatGenerator's four keys plus Cascade's own."""

    model_config = ConfigDict(extra="allow")

    successful_chat_generator_index: int | None = None
    successful_chat_generator_class: str | None = None
    total_attempts: int = 0
    failed_chat_generators: list[str] = Field(default_factory=list)
    provider: str | None = None
    chain: str | None = None
    attempts: list[AttemptRecord] = Field(default_factory=list)
    timings: Timings = Field(default_factory=Timings)
    worker: str | None = None
    queue_hops: int = 0


class ErrorInfo(BaseModel):
    """Why a request did not succeed. ``type`` is one of the taxonomy's codes."""

    type: str
    message: str


ReplyStatus = Literal["succeeded", "failed", "cancelled"]


class ChatReply(BaseModel):
    """The final outcome of a request, stored at ``cascade:reply:{request_id}``."""

    v: Literal[1] = 1
    request_id: str
    status: ReplyStatus
    replies: list[AssistantReply] = Field(default_factory=list)
    meta: ChainMeta = Field(default_factory=ChainMeta)
    error: ErrorInfo | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


EventType = Literal["start", "chunk", "fallback", "done", "error", "cancelled"]
TERMINAL_EVENT_TYPES: frozenset[str] = frozenset({"done", "error", "cancelled"})


class StreamEvent(BaseModel):
    """One event of a request's stream, published on ``cascade:stream:{id}`` and appended to
    ``cascade:events:{id}``.

    - ``start``: the worker took the request (``chain``, ``worker``).
    - ``chunk``: ``delta`` text from ``provider`` in ``attempt``.
    - ``fallback``: ``attempt`` of ``provider`` failed with ``error_type``; discard its deltas.
    - ``done`` (``reply``), ``error`` (``error``, ``reply``), ``cancelled`` (``reply``): the
      last event of the request, exactly one of them.
    """

    model_config = ConfigDict(extra="forbid")

    v: Literal[1] = 1
    type: EventType
    request_id: str
    seq: int = Field(ge=0)
    ts: float | None = Field(default=None, description="unix time the event was emitted")
    delta: str | None = None
    provider: str | None = None
    attempt: int | None = None
    error_type: str | None = None
    chain: str | None = None
    worker: str | None = None
    error: ErrorInfo | None = None
    reply: ChatReply | None = None

    @property
    def is_terminal(self) -> bool:
        """True for ``done``, ``error`` and ``cancelled``."""
        return self.type in TERMINAL_EVENT_TYPES


class HandOff(BaseModel):
    """What a worker passes on when the chain continues on another queue (the ``handoff``
    keyword of an internal ``cascade.chat`` message; producers never send it)."""

    model_config = ConfigDict(extra="forbid")

    start_index: int = Field(ge=0)
    attempts: list[AttemptRecord] = Field(default_factory=list)
    next_seq: int = Field(ge=0)
    queue_hops: int = Field(ge=1)
    deadline_at: float = Field(description="unix time the request's deadline passes")
    started_at: float = Field(description="unix time the first worker started the request")
    first_chunk_at: float | None = None
    submitted_at: float | None = None
