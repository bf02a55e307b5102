"""Building providers from their config entries, once per worker process.

Provider modules are imported only when a provider of their type is built, so a worker that
serves API providers never imports torch or transformers.
"""

from __future__ import annotations

import importlib
import threading

from providers.base import ChatProvider, OnChunk, ProviderCall
from settings.providers import ProviderConfigBase
from tasks.contract.schemas import AssistantReply

# type name -> "module:Class"; imported lazily.
PROVIDER_CLASSES: dict[str, str] = {
    "scripted": "providers.scripted:ScriptedProvider",
    "openai": "providers.openai.chat:OpenAIChatProvider",
    "openai_responses": "providers.openai.responses:OpenAIResponsesProvider",
    "azure_openai": "providers.openai.azure:AzureOpenAIChatProvider",
    "azure_openai_responses": "providers.openai.azure:AzureOpenAIResponsesProvider",
    "hf_api": "providers.huggingface.api:HfApiProvider",
    "hf_local": "providers.huggingface.local:HfLocalProvider",
    # Image providers (providers.images.ImageProvider): they serve cascade.image, not chat chains.
    "openai_image": "providers.openai.images:OpenAIImageProvider",
    "azure_openai_image": "providers.openai.images:AzureOpenAIImageProvider",
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

    def built(self, provider_id: str) -> ChatProvider | None:
        """The provider ``provider_id`` if this process has built it (never builds it).

        Read without the lock, which ``get`` holds while a model loads: one dict lookup is atomic."""
        return self._providers.get(provider_id)

    def chain(self, provider_ids: list[str]) -> list[ChatProvider]:
        """Handles on the providers of a chain, in order; each is built when first called, so
        a worker never builds (or imports the libraries of) a provider it hands off."""
        return [ProviderHandle(self, provider_id, self._configs[provider_id]) for provider_id in provider_ids]


class ProviderHandle(ChatProvider):
    """A provider of a pool, built on its first ``run``; its id, config and queue are known
    without building it."""

    def __init__(self, pool: ProviderPool, provider_id: str, config: ProviderConfigBase) -> None:
        self._pool = pool
        super().__init__(provider_id, config)

    @property
    def config(self) -> ProviderConfigBase:
        """The entry; once this process has built the provider, the provider's own, which may
        know more (a local model's ``supports_tools``, read from its chat template)."""
        built = self._pool.built(self.provider_id)
        return built.config if built is not None else self._entry

    @config.setter
    def config(self, entry: ProviderConfigBase) -> None:
        self._entry = entry

    @property
    def provider_class_name(self) -> str:
        """The class name of the provider behind the handle (for Haystack's meta key)."""
        return PROVIDER_CLASSES[self.config.type].rpartition(":")[2]

    def warm_up(self) -> None:
        """Build the provider (and load what it needs) now."""
        self._pool.get(self.provider_id)

    def run(self, call: ProviderCall, on_chunk: OnChunk) -> list[AssistantReply]:
        """Build the provider if needed and run it."""
        return self._pool.get(self.provider_id).run(call, on_chunk)
