"""Typed configuration: ``CASCADE_*`` environment variables plus the TOML file of providers
and chains (``CASCADE_CONFIG``)."""

from settings.base import Settings, redact_url
from settings.loader import ConfigError, load_settings
from settings.providers import PROVIDER_CONFIG_TYPES, ProviderConfigBase, ScriptedConfig

__all__ = [
    "PROVIDER_CONFIG_TYPES",
    "ConfigError",
    "ProviderConfigBase",
    "ScriptedConfig",
    "Settings",
    "load_settings",
    "redact_url",
]
