"""Typed provider entries of the TOML file (``[providers.<id>]``), one model per provider type.

Every entry shares the fields of ``ProviderConfigBase`` (queue, timeouts, retry policy); the
``type`` key picks the rest. ``PROVIDER_CONFIG_TYPES`` maps each type name to its model so the
settings loader can report an unknown type by name.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.contract.common import field_error

ScriptedFailure = Literal[
    "rate_limit",
    "timeout",
    "server_error",
    "overloaded",
    "connection_error",
    "auth",
    "unknown_model",
    "context_length",
    "content_filter",
    "bad_request",
    "cut",
    "crash",  # the process exits mid-call (os._exit), as after an OOM kill or a segfault
]


class ProviderConfigBase(BaseModel):
    """Fields every provider type has."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    queue: str = Field(default="chat", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    timeout_s: float = Field(default=60.0, gt=0, description="whole-call wall-clock limit")
    first_chunk_timeout_s: float | None = Field(default=None, gt=0)
    max_retries: int = Field(default=2, ge=0, le=10, description="extra tries on transient errors")
    backoff_initial_s: float = Field(default=0.5, ge=0)
    backoff_max_s: float = Field(default=8.0, ge=0)
    retry_after_max_s: float = Field(
        default=30.0, ge=0, description="longest Retry-After honoured; longer ones fall through"
    )
    # Cooldown: after `cooldown_failures` failures within `cooldown_window_s`, every worker
    # skips the provider for `cooldown_s`. 0 failures turns it off.
    cooldown_failures: int = Field(default=5, ge=0)
    cooldown_window_s: float = Field(default=60.0, gt=0)
    cooldown_s: float = Field(default=30.0, gt=0)
    # Capabilities: None takes the type's default (TYPE_CAPABILITIES).
    supports_tools: bool | None = Field(default=None, description="takes tools and tool messages")
    supports_images: bool | None = Field(default=None, description="takes image parts in user messages")
    supports_json_schema: bool | None = Field(default=None, description="takes response_format json_schema")
    supports_n: bool | None = Field(default=None, description="answers n > 1 choices in one call")

    def capabilities(self) -> Capabilities:
        """What this provider can take: the entry's own ``supports_*``, else its type's defaults."""
        defaults = TYPE_CAPABILITIES.get(self.type, NO_CAPABILITIES)
        return Capabilities(
            tools=defaults.tools if self.supports_tools is None else self.supports_tools,
            images=defaults.images if self.supports_images is None else self.supports_images,
            json_schema=defaults.json_schema if self.supports_json_schema is None else self.supports_json_schema,
            n=defaults.n if self.supports_n is None else self.supports_n,
        )


class Capabilities(NamedTuple):
    """What a provider can take (see the module docstring)."""

    tools: bool
    images: bool
    json_schema: bool
    n: bool


NO_CAPABILITIES = Capabilities(tools=False, images=False, json_schema=False, n=False)
_ALL = Capabilities(tools=True, images=True, json_schema=True, n=True)
# The defaults of each type. The Responses API has no ``n``. TGI ignores ``n`` and many models
# served by ``hf_api`` read no images, so an ``hf_api`` entry for a vision model says
# ``supports_images = true``. ``hf_local`` takes tools when its model's chat template does: an
# entry that leaves ``supports_tools`` unset is taken to, until the worker that loads the model
# reads its template (``HfLocalConfig``); it takes no images, JSON schema or ``n``.
# ``scripted`` stands in for a capable model: an entry that plays one lacking something says so.
TYPE_CAPABILITIES: dict[str, Capabilities] = {
    "scripted": _ALL,
    "openai": _ALL,
    "azure_openai": _ALL,
    "openai_responses": _ALL._replace(n=False),
    "azure_openai_responses": _ALL._replace(n=False),
    "hf_api": Capabilities(tools=True, images=False, json_schema=True, n=False),
    "hf_local": NO_CAPABILITIES._replace(tools=True),
}


class ScriptedToolCall(BaseModel):
    """A tool call the scripted provider answers with; ``arguments`` is JSON text (an object
    is written as JSON); ``id`` defaults to a fresh ``call_...`` for each answer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    arguments: str | dict[str, Any] = "{}"
    id: str | None = Field(default=None, min_length=1, max_length=512)


class ScriptedConfig(ProviderConfigBase):
    """``type = "scripted"``: replays ``text`` in chunks at a set pace, failing on request;
    with ``tool_calls``, answers a request that offers tools with those calls."""

    type: Literal["scripted"] = "scripted"
    text: str = ""
    model: str = "scripted"
    chunk_size: int = Field(default=4, ge=1)
    first_chunk_delay_ms: float = Field(default=0.0, ge=0)
    chunk_delay_ms: float = Field(default=0.0, ge=0)
    fail: ScriptedFailure | None = None
    fail_after_chunks: int = Field(default=0, ge=0)
    fail_times: int | None = Field(default=None, ge=0)
    fail_delay_ms: float = Field(default=0.0, ge=0, description="time taken before failing")
    retry_after_s: float | None = Field(default=1.0, ge=0, description="Retry-After of rate_limit")
    # Scripted failures are deliberate, so they do not trip a cooldown unless asked to.
    cooldown_failures: int = Field(default=0, ge=0)
    tool_calls: list[ScriptedToolCall] = Field(default_factory=list, max_length=128)

    @model_validator(mode="after")
    def _something_to_say(self) -> ScriptedConfig:
        if not self.text and not self.tool_calls:
            field_error("ScriptedConfig", ["text"], "text (or tool_calls) is required", self.text)
        return self


class ApiProviderConfig(ProviderConfigBase):
    """Fields of every provider reached over HTTP."""

    model: str = Field(min_length=1)
    api_key_env: str | None = Field(default=None, description="name of the env var holding the key")
    generation_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="defaults; the request's generation_kwargs win"
    )
    stop_words: list[str] = Field(default_factory=list, max_length=16)
    # The operator's cap on generated tokens: a request may ask for fewer, never more, and one
    # that names no limit is sent this one. None leaves the model's own limit.
    max_output_tokens: int | None = Field(default=None, ge=1, description="cap on generated tokens per call")


class OpenAIConfig(ApiProviderConfig):
    """``type = "openai"``: Chat Completions on OpenAI or any OpenAI-compatible server."""

    type: Literal["openai"] = "openai"
    api_key_env: str | None = "OPENAI_API_KEY"
    api_base_url: str | None = None
    organization: str | None = None
    project: str | None = None  # the OpenAI project the usage is billed to (``OpenAI-Project``)


class OpenAIResponsesConfig(OpenAIConfig):
    """``type = "openai_responses"``: the Responses API (reasoning, text format)."""

    type: Literal["openai_responses"] = "openai_responses"  # type: ignore[assignment]


class AzureOpenAIConfig(ApiProviderConfig):
    """``type = "azure_openai"``: Chat Completions on an Azure OpenAI deployment.

    Authenticates with the key in ``api_key_env``, or an Azure AD token from
    ``azure_ad_token_env`` or from ``azure_ad_token_provider`` (``"module:callable"``
    returning a token string, called before each request).
    """

    type: Literal["azure_openai"] = "azure_openai"
    model: str = ""
    azure_endpoint: str = Field(min_length=1)
    azure_deployment: str = Field(min_length=1)
    api_version: str = "2024-12-01-preview"
    api_key_env: str | None = "AZURE_OPENAI_API_KEY"
    azure_ad_token_env: str | None = None
    azure_ad_token_provider: str | None = Field(default=None, pattern=r"^[\w.]+:[\w.]+$")

    @property
    def model_name(self) -> str:
        """The model to report: ``model`` when set, else the deployment name."""
        return self.model or self.azure_deployment


class AzureOpenAIResponsesConfig(AzureOpenAIConfig):
    """``type = "azure_openai_responses"``: the Responses API on Azure OpenAI."""

    type: Literal["azure_openai_responses"] = "azure_openai_responses"  # type: ignore[assignment]


HfApiType = Literal["serverless_inference_api", "inference_endpoints", "text_generation_inference"]


class HfApiConfig(ApiProviderConfig):
    """``type = "hf_api"``: Hugging Face Inference Providers (``model`` + ``provider``),
    Inference Endpoints or TGI (``url``), through ``huggingface_hub.InferenceClient``."""

    type: Literal["hf_api"] = "hf_api"
    api_type: HfApiType = "serverless_inference_api"
    model: str = ""
    url: str | None = None
    provider: str | None = Field(default=None, description="inference provider, e.g. 'together'")
    # A Hugging Face token (this, then HF_TOKEN) goes only to Hugging Face's hosts; a self-hosted
    # ``url`` gets a key only when the entry sets ``api_key_env`` itself (providers.huggingface.api).
    api_key_env: str | None = "HF_API_TOKEN"

    @model_validator(mode="after")
    def _target(self) -> HfApiConfig:
        if self.api_type == "serverless_inference_api" and not self.model:
            raise ValueError("model is required for api_type serverless_inference_api")
        if self.api_type != "serverless_inference_api" and not self.url:
            raise ValueError(f"url is required for api_type {self.api_type}")
        return self


class HfLocalConfig(ProviderConfigBase):
    """``type = "hf_local"``: a transformers model loaded once per worker process.

    ``model`` is a hub id (resolved offline from the local cache, or from the GGUF file a
    package ships — see ``providers.huggingface.local_models``) or a local folder.

    Tools: the request's tools go to the chat template, and the model's calls are read in
    ``tool_call_format`` (``providers.huggingface.tool_calls``: ``hermes``, ``template``,
    ``json``; ``auto`` picks by the tokenizer). With ``supports_tools`` unset, the worker that
    loads the model sets it from the chat template: one that never reads ``tools`` makes the
    provider one without tools. Set it to ``false`` to skip the provider for tool requests on
    any worker, before a hand-off to the model's queue.
    """

    type: Literal["hf_local"] = "hf_local"
    queue: str = Field(default="chat.gpu", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    model: str = Field(min_length=1)
    gguf_file: str | None = Field(default=None, description="load this GGUF file of `model` and convert it once")
    device: str = Field(default="auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")
    torch_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device_map: str | None = None
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    chat_template: str | None = Field(default=None, description="a Jinja template overriding the tokenizer's")
    enable_thinking: bool | None = None
    tool_call_format: Literal["auto", "hermes", "template", "json"] = Field(
        default="auto", description="how the model writes tool calls"
    )
    generation_kwargs: dict[str, Any] = Field(default_factory=dict)
    stop_words: list[str] = Field(default_factory=list, max_length=16)
    # The default and the cap of generated tokens: a request may ask for fewer, never more.
    max_new_tokens: int = Field(default=512, ge=1)
    timeout_s: float = Field(default=600.0, gt=0)
    cooldown_failures: int = Field(default=0, ge=0)
    # Continuous batching (providers.huggingface.batching): up to max_batch_size requests share
    # the model at once in a worker started with `-P threads -c <max_batch_size>`; 1 generates
    # one request at a time. The paged KV cache holds kv_num_blocks blocks of kv_block_size
    # tokens; unset, it is sized for max_batch_size requests of max_tokens_per_request tokens
    # each, or, with kv_memory_fraction, to that share of the device memory left free.
    max_batch_size: int = Field(default=1, ge=1, le=512, description="requests generated together")
    kv_block_size: int = Field(default=256, ge=4, le=8192, description="tokens per KV cache block")
    kv_num_blocks: int | None = Field(default=None, ge=1, description="KV cache blocks (default: sized by the others)")
    kv_memory_fraction: float | None = Field(default=None, gt=0, le=1, description="KV cache share of free memory")
    max_tokens_per_request: int = Field(
        default=2048, ge=2, description="prompt + generated tokens one batched request may hold"
    )

    @model_validator(mode="after")
    def _batching(self) -> HfLocalConfig:
        if self.max_batch_size == 1:
            return self
        if self.kv_num_blocks is not None and self.kv_memory_fraction is not None:
            raise ValueError("set kv_num_blocks or kv_memory_fraction, not both")
        if self.max_new_tokens >= self.max_tokens_per_request:
            raise ValueError("max_tokens_per_request must exceed max_new_tokens (it holds the prompt too)")
        if self.kv_num_blocks is not None and self.kv_num_blocks * self.kv_block_size < self.max_tokens_per_request:
            raise ValueError("kv_num_blocks * kv_block_size must hold at least max_tokens_per_request tokens")
        return self


PROVIDER_CONFIG_TYPES: dict[str, type[ProviderConfigBase]] = {
    "scripted": ScriptedConfig,
    "openai": OpenAIConfig,
    "openai_responses": OpenAIResponsesConfig,
    "azure_openai": AzureOpenAIConfig,
    "azure_openai_responses": AzureOpenAIResponsesConfig,
    "hf_api": HfApiConfig,
    "hf_local": HfLocalConfig,
}


# --- image providers (cascade.image) --------------------------------------------------------

# Fields of the chat entries an image entry inherits but has no use for: setting one is a mistake.
_CHAT_ONLY_FIELDS = ("generation_kwargs", "stop_words", "max_output_tokens")
DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024


class ImageProviderFields(BaseModel):
    """Fields every image provider type has, on top of its chat counterpart's connection fields.

    ``max_image_bytes`` bounds each image (decoded or downloaded) before it is kept;
    ``max_images`` is the operator's cap on a request's ``n`` (a request asking for more is
    refused); ``partial_images`` (1-3) streams that many partial images from a model that
    can (gpt-image-1) when a request asks for one image.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_image_bytes: int = Field(default=DEFAULT_MAX_IMAGE_BYTES, ge=1, le=256 * 1024 * 1024)
    max_images: int = Field(default=10, ge=1, le=10)
    partial_images: int = Field(default=0, ge=0, le=3)
    response_format: Literal["b64_json", "url"] = Field(
        default="b64_json", description="what a DALL-E model is asked to answer with"
    )

    @model_validator(mode="after")
    def _no_chat_fields(self) -> ImageProviderFields:
        misplaced = [name for name in _CHAT_ONLY_FIELDS if name in self.model_fields_set]
        if misplaced:
            raise ValueError(f"{', '.join(misplaced)}: not a setting of an image provider")
        return self


class OpenAIImageConfig(ImageProviderFields, OpenAIConfig):
    """``type = "openai_image"``: the Images API (DALL-E 2, DALL-E 3, gpt-image-1) on OpenAI or
    a compatible server; each known model's parameters are checked before a call."""

    type: Literal["openai_image"] = "openai_image"  # type: ignore[assignment]
    timeout_s: float = Field(default=120.0, gt=0, description="whole-call wall-clock limit")


class AzureOpenAIImageConfig(ImageProviderFields, AzureOpenAIConfig):
    """``type = "azure_openai_image"``: the Images API on an Azure OpenAI deployment.

    ``model`` names the deployed model (``dall-e-3``, ``gpt-image-1``) so that its parameters
    are checked; without it the deployment's name is used, and a name that is no known model
    sends the request's parameters unchecked.
    """

    type: Literal["azure_openai_image"] = "azure_openai_image"  # type: ignore[assignment]
    api_version: str = "2025-04-01-preview"
    timeout_s: float = Field(default=120.0, gt=0, description="whole-call wall-clock limit")


PROVIDER_CONFIG_TYPES.update({"openai_image": OpenAIImageConfig, "azure_openai_image": AzureOpenAIImageConfig})
