"""Typed provider entries of the TOML file (``[providers.<id>]``), one model per provider type.

Every entry shares the fields of ``ProviderConfigBase`` (queue, timeouts, retry policy); the
``type`` key picks the rest. ``PROVIDER_CONFIG_TYPES`` maps each type name to its model so the
settings loader can report an unknown type by name.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

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


class ScriptedConfig(ProviderConfigBase):
    """``type = "scripted"``: replays ``text`` in chunks at a set pace, failing on request."""

    type: Literal["scripted"] = "scripted"
    text: str = Field(min_length=1)
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


PROVIDER_CONFIG_TYPES: dict[str, type[ProviderConfigBase]] = {
    "scripted": ScriptedConfig,
}
