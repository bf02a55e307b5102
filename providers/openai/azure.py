"""The ``azure_openai`` and ``azure_openai_responses`` providers: the OpenAI providers with an
``openai.AzureOpenAI`` client.

The client targets ``{azure_endpoint}/openai/deployments/{azure_deployment}`` with
``api-version`` in the query; Chat Completions go to the deployment's URL, the Responses API
to ``{azure_endpoint}/openai/responses`` with the deployment as the body's ``model``.

Credentials, first found wins: ``azure_ad_token_provider`` (``"module:callable"``, imported
once, called by the SDK before each request), the Azure AD token in ``azure_ad_token_env``
(sent as ``Authorization: Bearer``), the key in ``api_key_env`` (sent as ``api-key``).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

import openai

from providers import errors
from providers.messages import read_secret
from providers.openai.chat import OpenAIChatProvider
from providers.openai.responses import OpenAIResponsesProvider
from settings.providers import AzureOpenAIConfig

# Azure accepts max_completion_tokens from this API version on; older ones only max_tokens.
_MAX_COMPLETION_TOKENS_SINCE = "2024-09-01"


def build_azure_client(provider_id: str, config: AzureOpenAIConfig) -> tuple[openai.OpenAI, tuple[str, ...]]:
    """An ``AzureOpenAI`` client for ``config`` and the static secrets it holds."""
    auth: dict[str, Any]
    secrets: tuple[str, ...] = ()
    if config.azure_ad_token_provider:
        auth = {"azure_ad_token_provider": _token_provider(provider_id, config.azure_ad_token_provider)}
    else:
        token = read_secret(provider_id, config.azure_ad_token_env, required=False)
        key = None if token else read_secret(provider_id, config.api_key_env, required=False)
        if not token and not key:
            names = " / ".join(name for name in (config.api_key_env, config.azure_ad_token_env) if name) or "(none)"
            raise errors.AuthenticationFailed(f"{provider_id}: no credential in env var {names}")
        auth = {"azure_ad_token": token} if token else {"api_key": key}
        secrets = tuple(value for value in (token, key) if value)
    client = openai.AzureOpenAI(
        azure_endpoint=config.azure_endpoint,
        azure_deployment=config.azure_deployment,
        api_version=config.api_version,
        max_retries=0,
        timeout=config.timeout_s,
        **auth,
    )
    return client, secrets


def azure_max_tokens_key(api_version: str) -> str:
    """``max_completion_tokens`` for API versions that know it (and non-dated ones), else ``max_tokens``."""
    dated = re.match(r"\d{4}-\d{2}-\d{2}", api_version)
    return "max_tokens" if dated and dated.group() < _MAX_COMPLETION_TOKENS_SINCE else "max_completion_tokens"


def _token_provider(provider_id: str, spec: str) -> Callable[[], str]:
    """The configured token callable, wrapped so its failures read as ``AuthenticationFailed``."""
    module_name, _, attribute = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise errors.ProviderUnavailable(
            f"{provider_id}: azure_ad_token_provider {spec} cannot be imported ({type(exc).__name__})"
        ) from None
    if not callable(target):
        raise errors.ProviderUnavailable(f"{provider_id}: azure_ad_token_provider {spec} is not callable")
    get_token: Callable[[], object] = target

    def token() -> str:
        try:
            value = get_token()
        except Exception as exc:  # noqa: BLE001 - any failure of the credential source is an auth failure
            raise errors.AuthenticationFailed(
                f"{provider_id}: azure_ad_token_provider failed ({type(exc).__name__})"
            ) from None
        if not isinstance(value, str) or not value:
            raise errors.AuthenticationFailed(f"{provider_id}: azure_ad_token_provider returned no token")
        return value

    return token


class AzureOpenAIChatProvider(OpenAIChatProvider):
    """``type = "azure_openai"``: Chat Completions on an Azure OpenAI deployment."""

    config: AzureOpenAIConfig

    def build_client(self) -> tuple[openai.OpenAI, tuple[str, ...]]:
        """An ``AzureOpenAI`` client; see ``build_azure_client``."""
        return build_azure_client(self.provider_id, self.config)

    @property
    def wire_model(self) -> str:
        """The configured model name (the deployment's URL picks the model on Azure)."""
        return self.config.model_name

    @property
    def max_tokens_key(self) -> str:
        """Depends on ``api_version``; see ``azure_max_tokens_key``."""
        return azure_max_tokens_key(self.config.api_version)


class AzureOpenAIResponsesProvider(OpenAIResponsesProvider):
    """``type = "azure_openai_responses"``: the Responses API on Azure OpenAI."""

    config: AzureOpenAIConfig

    def build_client(self) -> tuple[openai.OpenAI, tuple[str, ...]]:
        """An ``AzureOpenAI`` client; see ``build_azure_client``."""
        return build_azure_client(self.provider_id, self.config)

    @property
    def wire_model(self) -> str:
        """The deployment: Azure's Responses API takes it as the body's ``model``."""
        return self.config.azure_deployment
