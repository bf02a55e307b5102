"""The pieces of the wire contract both tasks share: request ids, how the chain ran (attempts,
timings, the chain's meta), errors, and errors that name the field at fault.

Part of the wire contract (``tasks.contract.schemas`` re-exports every public name); it imports nothing
else of Cascade's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal, NoReturn

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.config import JsonDict
from pydantic_core import InitErrorDetails, PydanticCustomError

# The alphabet of request ids: they become part of Redis keys, so no spaces, colons, braces
# or glob characters, and a bounded length.
REQUEST_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
CHAIN_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
# metadata is echoed back in the reply and the done event.
MAX_METADATA_KEYS = 64

RequestId = Annotated[str, Field(pattern=REQUEST_ID_PATTERN)]
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
# The default cap on a task message's body, shared by workers (``max_message_bytes``) and the
# Python client, which refuses what a worker would.
DEFAULT_MAX_MESSAGE_BYTES = 2_000_000


def usable_request_id(candidate: object) -> str | None:
    """``candidate`` if it is a valid request id (usable in a Redis key, a span, a log line), else None."""
    return candidate if isinstance(candidate, str) and _REQUEST_ID.fullmatch(candidate) else None


def field_error(title: str, loc: Sequence[str | int], message: str, value: Any = None) -> NoReturn:
    """Raise a validation error located at ``loc`` (relative to the model being validated).

    A check that spans several fields runs in a model validator, whose own errors would point
    at the whole model; this names the field at fault instead (``messages.3.tool_call_id``).
    """
    # The message goes in as context, not as the template, so braces in it stay as they are.
    error = PydanticCustomError("invalid_field", "{reason}", {"reason": message})
    raise ValidationError.from_exception_data(title, [InitErrorDetails(type=error, loc=tuple(loc), input=value)])


def also_required(*names: str) -> Callable[[JsonDict], None]:
    """A ``json_schema_extra`` marking fields with defaults as required: workers always write
    them, so readers may rely on them."""

    def extra(schema: JsonDict) -> None:
        required = schema.setdefault("required", [])
        assert isinstance(required, list)
        required.extend(name for name in names if name not in required)

    return extra


def check_metadata(title: str, metadata: dict[str, Any]) -> None:
    """Refuse metadata with more than ``MAX_METADATA_KEYS`` keys."""
    if len(metadata) > MAX_METADATA_KEYS:
        field_error(title, ["metadata"], f"metadata may hold at most {MAX_METADATA_KEYS} keys", len(metadata))


class Usage(BaseModel):
    """Token counts of one reply."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


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
