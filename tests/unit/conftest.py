"""Shared fixtures of the unit tests: an in-memory Redis and settings built from plain dicts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import fakeredis
import pytest

from settings import ScriptedConfig, Settings

SettingsFactory = Callable[..., Settings]


@pytest.fixture
def fake_redis() -> fakeredis.FakeRedis:
    """A fresh in-memory Redis (bytes responses, as the product's clients use)."""
    return fakeredis.FakeRedis()


@pytest.fixture
def make_settings() -> SettingsFactory:
    """Build ``Settings`` from ``{provider_id: {scripted fields}}`` and ``{chain: [ids]}``."""

    def build(
        providers: dict[str, dict[str, Any]] | None = None,
        chains: dict[str, list[str]] | None = None,
        **fields: Any,
    ) -> Settings:
        providers = providers if providers is not None else {"steady": {"text": "Hello world!"}}
        chains = chains if chains is not None else {"default": list(providers)}
        configs = {pid: ScriptedConfig(**entry) for pid, entry in providers.items()}
        return Settings(providers=configs, chains=chains, **fields)

    return build
