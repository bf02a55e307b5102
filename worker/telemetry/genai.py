"""OpenTelemetry GenAI semantic-convention names and how Cascade's providers map onto them.

https://opentelemetry.io/docs/specs/semconv/gen-ai/ — spans and metrics share these
attributes, so a trace and a dashboard speak of a provider and a model the same way.
"""

from __future__ import annotations

from typing import Any

from settings import ProviderConfigBase
from settings.providers import ImageProviderFields

OPERATION_NAME = "gen_ai.operation.name"
PROVIDER_NAME = "gen_ai.provider.name"
# The attribute older backends and dashboards still read (renamed to gen_ai.provider.name).
SYSTEM = "gen_ai.system"
REQUEST_MODEL = "gen_ai.request.model"
REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
REQUEST_TEMPERATURE = "gen_ai.request.temperature"
REQUEST_TOP_P = "gen_ai.request.top_p"
RESPONSE_MODEL = "gen_ai.response.model"
RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
TOKEN_TYPE = "gen_ai.token.type"  # noqa: S105 - an attribute name, not a secret
INPUT_MESSAGES = "gen_ai.input.messages"
OUTPUT_MESSAGES = "gen_ai.output.messages"
ERROR_TYPE = "error.type"

CHAT = "chat"
# The spec's operation for content other than chat text (its example: Gemini's generateContent);
# an image provider's calls (cascade.image) are that.
GENERATE_CONTENT = "generate_content"

# Provider type -> gen_ai.provider.name (the spec's well-known values where one exists).
_PROVIDER_NAMES = {
    "openai": "openai",
    "openai_responses": "openai",
    "azure_openai": "azure.ai.openai",
    "azure_openai_responses": "azure.ai.openai",
    "hf_api": "huggingface",
    "hf_local": "transformers",
    "scripted": "cascade.scripted",
    "openai_image": "openai",
    "azure_openai_image": "azure.ai.openai",
}


def operation_name(config: ProviderConfigBase | None) -> str:
    """``gen_ai.operation.name`` of a provider entry's calls: ``generate_content`` for an image
    provider, ``chat`` for every other."""
    return GENERATE_CONTENT if isinstance(config, ImageProviderFields) else CHAT


def provider_name(config: ProviderConfigBase | None) -> str:
    """``gen_ai.provider.name`` of a provider entry (``_OTHER`` when unknown, as the spec says)."""
    if config is None:
        return "_OTHER"
    return _PROVIDER_NAMES.get(config.type, config.type)


def request_model(config: ProviderConfigBase | None) -> str | None:
    """The model a provider entry asks for (Azure's deployment when it names no model)."""
    if config is None:
        return None
    model = getattr(config, "model_name", None) or getattr(config, "model", None)
    return model if isinstance(model, str) and model else None


def provider_attributes(config: ProviderConfigBase | None) -> dict[str, Any]:
    """The attributes that name the operation, the provider and the requested model."""
    attributes: dict[str, Any] = {OPERATION_NAME: operation_name(config), PROVIDER_NAME: provider_name(config)}
    attributes[SYSTEM] = attributes[PROVIDER_NAME]
    model = request_model(config)
    if model is not None:
        attributes[REQUEST_MODEL] = model
    return attributes
