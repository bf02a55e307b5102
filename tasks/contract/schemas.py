"""Wire schemas: what producers send and what subscribers and reply readers get back.

These pydantic models are the public contract of ``cascade.chat`` and ``cascade.image`` (the
README's "The contract in short"). The JSON Schema files in ``schemas/`` are generated from them
(``python -m tasks.schema_export``) and a test fails when the two drift apart. Messages and
tools live in ``tasks.contract.messages``, the image task's models in ``tasks.contract.images`` and the parts both
tasks share in ``tasks.contract.common``; this module re-exports them all, so ``tasks.contract.schemas`` is
the one import path. None of them imports anything else of Cascade's, so every layer may use
them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from tasks.contract.common import (
    CHAIN_PATTERN,
    DEFAULT_MAX_MESSAGE_BYTES,
    REQUEST_ID_PATTERN,
    AttemptOutcome,
    AttemptRecord,
    ChainMeta,
    ErrorInfo,
    ReplyStatus,
    RequestId,
    Timings,
    Usage,
    also_required,
    check_metadata,
    field_error,
    usable_request_id,
)
from tasks.contract.images import IMAGE_TASK_NAME, GeneratedImage, ImageReply, ImageRequest
from tasks.contract.messages import (
    MAX_CONTENT_CHARS,
    MAX_IMAGE_BYTES,
    MAX_TOOLS,
    ChatMessage,
    ContentPart,
    FunctionCall,
    FunctionDefinition,
    ImagePart,
    ImageUrl,
    JsonSchemaFormat,
    NamedToolChoice,
    ResponseFormat,
    Role,
    TextPart,
    ToolCall,
    ToolChoice,
    ToolChoiceFunction,
    ToolDefinition,
    check_json_schema,
    check_tools,
)

__all__ = [
    "CHAIN_PATTERN",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "IMAGE_TASK_NAME",
    "MAX_CHOICES",
    "MAX_CONTENT_CHARS",
    "MAX_IMAGE_BYTES",
    "MAX_MESSAGES",
    "REQUEST_ID_HEADER",
    "REQUEST_ID_PATTERN",
    "SCHEMA_VERSION",
    "SUBMITTED_AT_HEADER",
    "TASK_NAME",
    "TERMINAL_EVENT_TYPES",
    "AnyReply",
    "AssistantReply",
    "AttemptOutcome",
    "AttemptRecord",
    "ChainMeta",
    "ChatMessage",
    "ChatReply",
    "ChatRequest",
    "ContentPart",
    "ErrorInfo",
    "EventType",
    "FunctionCall",
    "FunctionDefinition",
    "GeneratedImage",
    "GenerationKwargs",
    "HallucinationScoreRequest",
    "HandOff",
    "ImagePart",
    "ImageReply",
    "ImageRequest",
    "ImageUrl",
    "JsonSchemaFormat",
    "NamedToolChoice",
    "ReplyMeta",
    "ReplyStatus",
    "RequestId",
    "ResponseFormat",
    "Role",
    "StreamEvent",
    "TextPart",
    "Timings",
    "ToolCall",
    "ToolCallDelta",
    "ToolChoice",
    "ToolChoiceFunction",
    "ToolDefinition",
    "Usage",
    "check_json_schema",
    "usable_request_id",
]

SCHEMA_VERSION = 1

# The Celery task every producer sends, whatever its language.
TASK_NAME = "cascade.chat"
# The queue a request goes to when its chain starts with an API provider.
DEFAULT_QUEUE = "chat"
# Optional message header (unix time) a producer may set so replies report time spent queued.
SUBMITTED_AT_HEADER = "cascade_submitted_at"
# Message header Cascade's own senders set to the request id, so a reaper scanning a queue for
# a request reads it without decoding each message's body (worker.state.pending).
REQUEST_ID_HEADER = "cascade_request_id"

# Hard caps of the schema itself; workers apply their own (smaller, configurable) limits too.
MAX_MESSAGES = 1024
MAX_CHOICES = 16


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
    response_format: ResponseFormat | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES, description="number of choices")

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


class HallucinationScoreRequest(BaseModel):
    """The ``hallucination_score`` option of a chat request: score each reply's risk of being a
    hallucination (the README's "Hallucination risk scoring"). Each field left out takes the
    default of Haystack's ``HallucinationScoreConfig``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    skeleton_policy: Literal["closed_book", "evidence_erase", "auto"] | None = None
    n_samples: int | None = Field(default=None, ge=1, le=32)
    m: int | None = Field(default=None, ge=1, le=16, description="skeletons per prompt")
    temperature: float | None = Field(default=None, ge=0, le=2)
    h_star: float | None = Field(default=None, gt=0, lt=1, description="target error rate")
    isr_threshold: float | None = Field(default=None, gt=0)
    margin_extra_bits: float | None = Field(default=None, ge=0)
    B_clip: float | None = Field(default=None, gt=0)
    clip_mode: Literal["one-sided", "symmetric"] | None = None


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
    chain: str = Field(default="default", pattern=CHAIN_PATTERN)
    generation_kwargs: GenerationKwargs = Field(default_factory=GenerationKwargs)
    tools: list[ToolDefinition] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    hallucination_score: HallucinationScoreRequest | None = None
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
        check_metadata("ChatRequest", self.metadata)
        check_tools("ChatRequest", self.tools, self.tool_choice, self.messages)
        return self

    @property
    def conversation(self) -> list[ChatMessage]:
        """The messages, never ``None`` after validation."""
        assert self.messages is not None
        return self.messages


class ReplyMeta(BaseModel):
    """Per-reply meta, with Haystack's keys (and its hallucination scorer's, when asked for)."""

    model_config = ConfigDict(extra="allow")

    model: str
    index: int = 0
    finish_reason: str | None = Field(default=None, description="stop, length, tool_calls, content_filter, ...")
    usage: Usage = Field(default_factory=Usage)
    completion_start_time: str | None = None
    hallucination_decision: Literal["ANSWER", "REFUSE"] | None = None
    hallucination_risk: float | None = Field(default=None, ge=0, le=1, description="the EDFL risk bound")
    hallucination_rationale: str | None = None
    hallucination_error: str | None = Field(default=None, description="why the reply is not scored")
    hallucination_scoring_calls: int | None = Field(default=None, ge=0)
    hallucination_scoring_usage: Usage | None = None


class AssistantReply(BaseModel):
    """One generated reply: the assistant message (``content``, ``tool_calls``) and its ``meta``.

    ``content`` is null only when the reply calls tools, so the message minus ``meta`` always
    validates as a request message (``to_message``).
    """

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None
    meta: ReplyMeta

    @model_validator(mode="after")
    def _content_or_calls(self) -> AssistantReply:
        if not self.tool_calls:
            self.tool_calls = None
            if self.content is None:
                self.content = ""
        return self

    def to_message(self) -> ChatMessage:
        """The reply as the assistant message to append to the next request's ``messages``."""
        return ChatMessage(role="assistant", content=self.content, tool_calls=self.tool_calls)


class ChatReply(BaseModel):
    """The final outcome of a chat request, stored at ``cascade:reply:{request_id}``."""

    # ``replies`` is always written (even as []): it tells a chat reply from an image reply.
    model_config = ConfigDict(json_schema_extra=also_required("replies"))

    v: Literal[1] = 1
    request_id: str
    status: ReplyStatus
    replies: list[AssistantReply] = Field(default_factory=list)
    meta: ChainMeta = Field(default_factory=ChainMeta)
    error: ErrorInfo | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


def _reply_kind(value: Any) -> str:
    # An image reply is the one with ``images``; every other reply (v1's included) is a chat reply.
    if isinstance(value, dict):
        return "image" if "images" in value else "chat"
    return "image" if isinstance(value, ImageReply) else "chat"


AnyReply = Annotated[
    Annotated[ChatReply, Tag("chat")] | Annotated[ImageReply, Tag("image")], Discriminator(_reply_kind)
]

EventType = Literal["start", "chunk", "image", "fallback", "done", "error", "cancelled"]
TERMINAL_EVENT_TYPES: frozenset[str] = frozenset({"done", "error", "cancelled"})


class ToolCallDelta(BaseModel):
    """A fragment of a streamed tool call; ``id`` and ``name`` come with a call's first one."""

    model_config = ConfigDict(extra="forbid")

    index: int = Field(ge=0, description="the call's position among its choice's tool calls")
    id: str | None = None
    name: str | None = None
    arguments_delta: str = ""


class StreamEvent(BaseModel):
    """One event of a request's stream, published on ``cascade:stream:{id}`` and appended to
    ``cascade:events:{id}``.

    - ``start``: the worker took the request (``chain``, ``worker``).
    - ``chunk``: from ``provider`` in ``attempt``, for choice ``index`` (0 unless ``n`` > 1):
      either ``delta`` text or a ``tool_call`` fragment.
    - ``image`` (``cascade.image``): image ``index`` is stored at ``key`` (``partial``: a
      partial image, where the provider streams them).
    - ``fallback``: ``attempt`` of ``provider`` failed with ``error_type``; discard its deltas.
    - ``done`` (``reply``), ``error`` (``error``, ``reply``), ``cancelled`` (``reply``): the
      last event of the request, exactly one of them. ``reply`` is a ``ChatReply`` for
      ``cascade.chat`` and an ``ImageReply`` for ``cascade.image``.
    """

    model_config = ConfigDict(extra="forbid")

    v: Literal[1] = 1
    type: EventType
    request_id: str
    seq: int = Field(ge=0)
    ts: float | None = Field(default=None, description="unix time the event was emitted")
    index: int | None = Field(default=None, ge=0, description="chunk: the choice; image: the image")
    delta: str | None = None
    tool_call: ToolCallDelta | None = None
    key: str | None = Field(default=None, description="image: where its bytes are stored")
    partial: bool | None = None
    provider: str | None = None
    attempt: int | None = None
    error_type: str | None = None
    chain: str | None = None
    worker: str | None = None
    error: ErrorInfo | None = None
    reply: AnyReply | None = None

    @model_validator(mode="after")
    def _fields_of_the_type(self) -> StreamEvent:
        if self.type == "chunk":
            if self.index is None:
                self.index = 0
            if self.delta is not None and self.tool_call is not None:
                field_error("StreamEvent", ["tool_call"], "a chunk carries either delta or tool_call, not both")
        elif self.tool_call is not None:
            field_error("StreamEvent", ["tool_call"], "only a chunk carries tool_call")
        if self.type == "image" and (self.index is None or self.key is None):
            field_error("StreamEvent", ["key" if self.index is not None else "index"], "an image event needs it")
        return self

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
