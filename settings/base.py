"""The worker's typed settings: ``CASCADE_*`` environment variables over a TOML file.

Secrets are never stored here: the Redis URL (which may carry a password) is a ``SecretStr``
and provider keys are referenced by the *name* of the env var that holds them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from settings.providers import DEFAULT_MAX_IMAGE_BYTES, PROVIDER_CONFIG_TYPES, ImageProviderFields, ProviderConfigBase
from tasks.contract.messages import MAX_CONTENT_PARTS, MAX_IMAGE_BYTES
from tasks.contract.schemas import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_QUEUE, MAX_MESSAGES

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs and error messages)."""
    parts = urlsplit(url)
    if parts.password is not None:
        user = parts.username or ""
        host_and_port = parts.netloc.rpartition("@")[2]  # keeps an IPv6 host's brackets
        parts = parts._replace(netloc=f"{user}:***@{host_and_port}")
    if "password=" in parts.query:  # redis-py also takes ?password=...
        query = "&".join("password=***" if item.startswith("password=") else item for item in parts.query.split("&"))
        parts = parts._replace(query=query)
    return urlunsplit(parts)


class Settings(BaseSettings):
    """Everything a worker (or the producer client) needs to know, validated at start.

    Environment variables (``CASCADE_REDIS_URL``, ``CASCADE_REPLY_TTL_S``...) win over the
    TOML file named by ``CASCADE_CONFIG``, which is where ``providers`` and ``chains`` live.
    """

    model_config = SettingsConfigDict(env_prefix="CASCADE_", extra="ignore", frozen=True)

    redis_url: SecretStr = SecretStr(DEFAULT_REDIS_URL)
    config: Path | None = Field(default=None, description="TOML file with providers and chains")
    worker_name: str | None = None

    # Lifetimes and bounds of what workers write to Redis.
    reply_ttl_s: int = Field(default=86_400, ge=1)
    events_ttl_s: int = Field(default=86_400, ge=1)
    events_maxlen: int = Field(default=20_000, ge=10)
    dead_letter_maxlen: int = Field(default=10_000, ge=1)
    dead_letter_ttl_s: int = Field(default=7 * 86_400, ge=1)

    # Request limits. A producer's timeout_s is capped at max_timeout_s.
    default_timeout_s: float = Field(default=300.0, gt=0)
    max_timeout_s: float = Field(default=900.0, gt=0)
    max_messages: int = Field(default=256, ge=1)
    max_input_chars: int = Field(default=200_000, ge=1)
    max_message_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, ge=1_000)
    # Operator limits win over request fields: a request asking for more choices (``n``) or
    # beams (``num_beams``, local models) than this is refused (request_too_large, naming the
    # field). Generated tokens are capped per provider instead (``max_output_tokens``, and
    # ``max_new_tokens`` of hf_local): a longer ask is cut down to the cap, not refused.
    max_choices: int = Field(default=4, ge=1, le=128)
    max_num_beams: int = Field(default=4, ge=1, le=64)
    # Images in requests, below the schema's own caps: the bytes of all the data: URL images of
    # one request together, how many images one request may hold, and whether https:// image
    # URLs are taken (off: only data: URLs, for a worker whose providers must not be told to
    # fetch from addresses a producer chose).
    max_input_image_bytes: int = Field(default=8 * 1024 * 1024, ge=0, le=MAX_CONTENT_PARTS * MAX_IMAGE_BYTES)
    max_input_images: int = Field(default=16, ge=0, le=MAX_MESSAGES * MAX_CONTENT_PARTS)
    allow_image_urls: bool = True
    # Hallucination risk scoring: decision calls one request has in flight at once.
    scoring_max_parallel: int = Field(default=8, ge=1, le=64)
    # The most bytes one generated image (cascade.image) may take in Redis, whatever a provider
    # entry's own max_image_bytes allows: the smaller of the two bounds each image.
    max_image_bytes: int = Field(default=DEFAULT_MAX_IMAGE_BYTES, ge=1, le=256 * 1024 * 1024)

    # Streaming: publish chunks that arrive within this many ms of the last publish as one
    # event (one Redis round trip per window, not per chunk); 0 publishes every chunk at once.
    # A provider streaming slower than this (an API, a GPU model) is never delayed; a faster
    # one costs a round trip per window (BENCHMARKS.md: throughput and streaming rate).
    coalesce_ms: float = Field(default=2.0, ge=0, le=1_000)

    # Connections to Redis (the workers' clients, and the broker's when worker.celery_app puts
    # the same in broker_transport_options): a reply slower than the socket timeout means the
    # connection is dead (a primary lost without a word, a NAT that dropped it), and the command
    # is tried again on a new one. Every command a worker's client sends answers at once, and the broker's BRPOP
    # blocks 1 s: the timeout must stay above both. TCP keepalive is always on; an idle
    # connection is checked with a PING before use after ``redis_health_check_interval_s``.
    redis_socket_timeout_s: float = Field(default=10.0, ge=2)
    redis_connect_timeout_s: float = Field(default=5.0, gt=0)
    redis_health_check_interval_s: int = Field(default=15, ge=0)

    # Leases: a dead worker's request is sent again once its lease lapses (see worker/state/lease.py).
    lease_ttl_s: float = Field(default=10.0, ge=0.5)
    reaper_interval_s: float = Field(default=2.0, gt=0)
    # A request whose run ended its worker process this many times (an OOM kill, a segfault)
    # is not resumed again: it ends failed, error type worker_lost (see worker/state/deaths.py).
    max_worker_deaths: int = Field(default=3, ge=1)
    # On SIGTERM, running requests get this long to finish before they are handed back.
    soft_shutdown_s: float = Field(default=30.0, ge=0)
    # A pool process warms up its providers (loads its local models) before it takes work;
    # Celery kills one that takes longer than this to start (its default, 4 s, is shorter
    # than loading most models).
    warm_up_timeout_s: float = Field(default=600.0, gt=0)

    # Celery's limits sit above the longest request so that the request's own deadline
    # always fires first and the soft limit is a last resort.
    soft_time_limit_s: float | None = None
    time_limit_s: float | None = None
    visibility_timeout_s: int | None = None

    providers: dict[str, ProviderConfigBase] = Field(default_factory=dict)
    chains: dict[str, list[str]] = Field(default_factory=dict)

    @field_validator("providers", mode="before")
    @classmethod
    def _typed_providers(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        typed: dict[str, Any] = {}
        problems: list[str] = []
        for provider_id, entry in value.items():
            if isinstance(entry, ProviderConfigBase):
                typed[provider_id] = entry
                continue
            if not isinstance(entry, dict):
                problems.append(f"providers.{provider_id}: must be a table")
                continue
            kind = entry.get("type")
            model = PROVIDER_CONFIG_TYPES.get(str(kind))
            if model is None:
                known = ", ".join(sorted(PROVIDER_CONFIG_TYPES))
                problems.append(f"providers.{provider_id}.type: unknown type {kind!r} (known: {known})")
                continue
            try:
                typed[provider_id] = model.model_validate(entry)
            except ValidationError as exc:
                for error in exc.errors():
                    key = ".".join(str(part) for part in ("providers", provider_id, *error["loc"]))
                    problems.append(f"{key}: {error['msg']}")
        if problems:
            # One ValueError carrying every problem, each already prefixed with its full key.
            raise ValueError("\n".join(problems))
        return typed

    @model_validator(mode="after")
    def _check_chains_and_limits(self) -> Settings:
        for provider_id in self.providers:
            if not _is_simple_name(provider_id):
                raise ValueError(f"providers.{provider_id}: ids may use letters, digits, '.', '_', '-'")
        for name, provider_ids in self.chains.items():
            if not _is_simple_name(name):
                raise ValueError(f"chains.{name}: names may use letters, digits, '.', '_', '-'")
            if not provider_ids:
                raise ValueError(f"chains.{name}: a chain needs at least one provider")
            for position, provider_id in enumerate(provider_ids):
                if provider_id not in self.providers:
                    raise ValueError(f"chains.{name}[{position}]: unknown provider {provider_id!r}")
            _check_one_kind(name, provider_ids, self.providers)
        if self.default_timeout_s > self.max_timeout_s:
            raise ValueError("default_timeout_s: must not exceed max_timeout_s")
        if self.hard_time_limit_s <= self.task_soft_time_limit_s:
            raise ValueError("time_limit_s: must be above soft_time_limit_s")
        if self.broker_visibility_timeout_s <= self.hard_time_limit_s:
            raise ValueError("visibility_timeout_s: must be above the hard time limit")
        return self

    @property
    def task_soft_time_limit_s(self) -> float:
        """Celery's soft limit: the longest request deadline plus a margin."""
        return self.soft_time_limit_s or self.max_timeout_s + 30.0

    @property
    def hard_time_limit_s(self) -> float:
        """Celery's hard limit: the soft limit plus time to store the reply."""
        return self.time_limit_s or self.task_soft_time_limit_s + 30.0

    @property
    def broker_visibility_timeout_s(self) -> int:
        """Redis visibility timeout: longer than any request may run (celery/celery#5935)."""
        return self.visibility_timeout_s or int(self.hard_time_limit_s) + 300

    @property
    def redis_socket_options(self) -> dict[str, Any]:
        """The connection options of every Redis client a worker opens, in the names redis-py
        and kombu's Redis transport (``broker_transport_options``) both take."""
        return {
            "socket_timeout": self.redis_socket_timeout_s,
            "socket_connect_timeout": self.redis_connect_timeout_s,
            "socket_keepalive": True,
            "health_check_interval": self.redis_health_check_interval_s,
        }

    @property
    def redis_dsn(self) -> str:
        """The Redis URL with its secret, for opening connections only."""
        return self.redis_url.get_secret_value()

    @property
    def redis_url_redacted(self) -> str:
        """The Redis URL with its password masked, for logs."""
        return redact_url(self.redis_dsn)

    @property
    def task_queues(self) -> frozenset[str]:
        """Every queue a Cascade task can be sent to: the default queue and each provider's."""
        return frozenset({DEFAULT_QUEUE, *(provider.queue for provider in self.providers.values())})

    def queue_of(self, provider_id: str) -> str:
        """The queue that serves ``provider_id``."""
        return self.providers[provider_id].queue

    def is_image_chain(self, chain: str) -> bool:
        """True if ``chain`` is a chain of image providers (``cascade.image``); False for a chat
        chain or one that does not exist. A chain is all of one kind (checked at load)."""
        provider_ids = self.chains.get(chain) or []
        return bool(provider_ids) and isinstance(self.providers[provider_ids[0]], ImageProviderFields)

    def image_bytes_limit(self, provider_id: str) -> int:
        """The most bytes one image of ``provider_id`` may take: its entry's ``max_image_bytes``
        within this worker's ``max_image_bytes``."""
        config = self.providers[provider_id]
        own = config.max_image_bytes if isinstance(config, ImageProviderFields) else self.max_image_bytes
        return min(own, self.max_image_bytes)


def _check_one_kind(chain: str, provider_ids: list[str], providers: dict[str, ProviderConfigBase]) -> None:
    """A chain is of chat providers (``cascade.chat``) or of image providers (``cascade.image``),
    never both: a request runs every provider of its chain the same way."""
    images = [pid for pid in provider_ids if isinstance(providers[pid], ImageProviderFields)]
    if images and len(images) != len(provider_ids):
        chat = [pid for pid in provider_ids if pid not in images]
        raise ValueError(
            f"chains.{chain}: mixes image providers ({', '.join(images)}) with chat providers "
            f"({', '.join(chat)}); a chain serves either cascade.chat or cascade.image"
        )


def _is_simple_name(name: str) -> bool:
    return bool(name) and len(name) <= 64 and all(c.isalnum() or c in "._-" for c in name)
