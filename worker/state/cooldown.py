"""Provider cooldowns shared by every worker through Redis.

Each failure of a provider is a member of the sorted set ``cascade:cooldown:failures:{id}``
scored by time; when ``cooldown_failures`` of them fall within ``cooldown_window_s`` the key
``cascade:cooldown:{id}`` is set for ``cooldown_s`` and every worker skips the provider until
it expires. Both keys expire by themselves, so a crashed worker leaves nothing behind.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import redis

from providers.chain import ChainMember
from tasks.contract import keys

FAILURES_KEY = keys.COOLDOWN_FAILURES
COOLDOWN_KEY = keys.COOLDOWN


class RedisCooldowns:
    """The ``CooldownGate`` of ``providers.chain`` on a Redis shared by all workers."""

    def __init__(self, client: redis.Redis, on_trip: Callable[[str], None] | None = None) -> None:
        self._client = client
        self._on_trip = on_trip  # told the provider id when this worker starts a cooldown (metrics)

    @staticmethod
    def key_of(provider_id: str, cooldown_failures: int) -> str | None:
        """The key whose existence means ``provider_id`` cools down; None when its cooldown is off."""
        return keys.cooldown_key(provider_id) if cooldown_failures else None

    def is_cooling_down(self, provider: ChainMember) -> bool:
        """True while the provider's cooldown key exists."""
        if provider.config.cooldown_failures == 0:
            return False
        return bool(self._client.exists(keys.cooldown_key(provider.provider_id)))

    def record_failure(self, provider: ChainMember) -> None:
        """Count a failure; start the cooldown when the window holds enough of them."""
        cfg = provider.config
        if cfg.cooldown_failures == 0:
            return
        now = time.time()
        failures = keys.cooldown_failures_key(provider.provider_id)
        pipe = self._client.pipeline(transaction=True)
        pipe.zadd(failures, {uuid.uuid4().hex: now})
        pipe.zremrangebyscore(failures, 0, now - cfg.cooldown_window_s)
        pipe.zcard(failures)
        pipe.expire(failures, int(cfg.cooldown_window_s) + 1)
        recent = pipe.execute()[2]
        if recent >= cfg.cooldown_failures:
            cooldown = keys.cooldown_key(provider.provider_id)
            # NX: a cooldown already running is not extended by failures of in-flight calls.
            started = self._client.set(cooldown, "1", px=int(cfg.cooldown_s * 1000), nx=True)
            self._client.delete(failures)
            if started and self._on_trip is not None:
                self._on_trip(provider.provider_id)


class ReadAhead:
    """A cooldown gate that answers the first question about one provider from a value the
    caller read ahead, in a round trip it made anyway; every other question goes to ``gate``."""

    def __init__(self, gate: RedisCooldowns, provider_id: str, cooling: bool) -> None:
        self._gate = gate
        self._provider_id = provider_id
        self._cooling: bool | None = cooling

    def is_cooling_down(self, provider: ChainMember) -> bool:
        """The value read ahead (once), else the gate's answer."""
        if provider.provider_id == self._provider_id and self._cooling is not None:
            cooling, self._cooling = self._cooling, None
            return cooling
        return self._gate.is_cooling_down(provider)

    def record_failure(self, provider: ChainMember) -> None:
        """Count a failure (the gate's job)."""
        self._gate.record_failure(provider)
