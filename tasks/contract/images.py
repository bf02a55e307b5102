"""Request and reply of ``cascade.image`` (the README's "Image generation").

Part of the wire contract (``tasks.contract.schemas`` re-exports every public name); it imports nothing
of Cascade's but the contract's own modules.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.contract.common import (
    CHAIN_PATTERN,
    ChainMeta,
    ErrorInfo,
    ReplyStatus,
    RequestId,
    also_required,
    check_metadata,
    field_error,
)

# The task an image producer sends, whatever its language.
IMAGE_TASK_NAME = "cascade.image"

# Hard caps of the schema itself; each provider checks its model's own (smaller) limits.
MAX_IMAGE_PROMPT_CHARS = 32_000
MAX_IMAGES = 10


class ImageRequest(BaseModel):
    """An image request as enqueued by a producer (task ``cascade.image``, keyword ``request``).

    ``size``, ``quality``, ``style``, ``background`` and ``output_format`` are passed to the
    provider, which refuses values its model does not take; absent means the model's default.
    """

    model_config = ConfigDict(extra="forbid")

    request_id: RequestId | None = None
    prompt: str = Field(min_length=1, max_length=MAX_IMAGE_PROMPT_CHARS)
    chain: str = Field(default="images", pattern=CHAIN_PATTERN)
    size: str | None = Field(default=None, pattern=r"^(auto|[1-9][0-9]{1,4}x[1-9][0-9]{1,4})$")
    quality: Literal["auto", "standard", "hd", "low", "medium", "high"] | None = None
    style: Literal["vivid", "natural"] | None = None
    background: Literal["auto", "transparent", "opaque"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_IMAGES)
    timeout_s: float | None = Field(default=None, gt=0, le=86_400)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> ImageRequest:
        if not self.prompt.strip():
            field_error("ImageRequest", ["prompt"], "prompt is blank", self.prompt)
        check_metadata("ImageRequest", self.metadata)
        return self


class GeneratedImage(BaseModel):
    """One image of a reply; its bytes are stored at ``key`` (``cascade:image:{request_id}:{index}``)."""

    key: str
    mime_type: str = Field(description="image/png, image/jpeg or image/webp")
    bytes: int = Field(ge=0, description="size of the stored image")
    revised_prompt: str | None = None


class ImageReply(BaseModel):
    """The final outcome of an image request, stored at ``cascade:reply:{request_id}``."""

    # ``images`` is always written (even as []): it tells an image reply from a chat reply.
    model_config = ConfigDict(json_schema_extra=also_required("images"))

    v: Literal[1] = 1
    request_id: str
    status: ReplyStatus
    images: list[GeneratedImage] = Field(default_factory=list)
    meta: ChainMeta = Field(default_factory=ChainMeta)
    error: ErrorInfo | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
