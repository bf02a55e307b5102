"""Building providers from their config entries, once per worker process.

Provider modules are imported only when a provider of their type is built, so a worker that
serves API providers never imports torch or transformers.
"""

from __future__ import annotations

import importlib
import threading

from providers.base import ChatProvider
from settings.providers import ProviderConfigBase

# type name -> "module:Class"; imported lazily.
PROVIDER_CLASSES: dict[str, str] = {
    "scripted": "providers.scripted:ScriptedProvider",
    "openai": "providers.openai_chat:OpenAIChatProvider",
    "openai_responses": "providers.openai_responses:OpenAIResponsesProvider",
    "azure_openai": "providers.azure_openai:AzureOpenAIChatProvider",
    "azure_openai_responses": "providers.azure_openai:AzureOpenAIResponsesProvider",
    "hf_api": "providers.hf_api:HfApiProvider",
    "hf_local": "providers.hf_local:HfLocalProvider",
}


def build_provider(provider_id: str, config: ProviderConfigBase) -> ChatProvider:
    """A new provider for the ``[providers.<provider_id>]`` entry ``config``."""
    module_name, _, class_name = PROVIDER_CLASSES[config.type].partition(":")
    provider_class = getattr(importlib.import_module(module_name), class_name)
    provider: ChatProvider = provider_class(provider_id, config)
    return provider


class ProviderPool:
    """The providers of one process, built on first use and kept warm."""

    def __init__(self, configs: dict[str, ProviderConfigBase]) -> None:
        self._configs = configs
        self._providers: dict[str, ChatProvider] = {}
        self._lock = threading.Lock()

    def get(self, provider_id: str) -> ChatProvider:
        """The provider ``provider_id``, built (and warmed up) the first time it is asked for."""
        with self._lock:
            provider = self._providers.get(provider_id)
            if provider is None:
                provider = build_provider(provider_id, self._configs[provider_id])
                provider.warm_up()
                self._providers[provider_id] = provider
            return provider

    def chain(self, provider_ids: list[str]) -> list[ChatProvider]:
        """The providers of a chain, in order."""
        return [self.get(provider_id) for provider_id in provider_ids]
