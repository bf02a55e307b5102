"""Provider cooldowns shared through Redis (worker/state/cooldown.py), on fakeredis with a fake clock."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import fakeredis
import pytest

from providers.base import ChatProvider
from providers.registry import build_provider
from settings import ScriptedConfig
from worker.state.cooldown import COOLDOWN_KEY, FAILURES_KEY, RedisCooldowns


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr("worker.state.cooldown.time", SimpleNamespace(time=fake.time))
    return fake


def provider(**fields: Any) -> ChatProvider:
    config = {"text": "x", "cooldown_failures": 3, "cooldown_window_s": 60.0, "cooldown_s": 30.0, **fields}
    return build_provider("p1", ScriptedConfig(**config))


def test_cooldown_starts_after_k_failures_in_the_window(fake_redis: fakeredis.FakeRedis, clock: Clock) -> None:
    gate, p = RedisCooldowns(fake_redis), provider()
    for _ in range(2):
        gate.record_failure(p)
        clock.now += 1
    assert not gate.is_cooling_down(p)
    gate.record_failure(p)
    assert gate.is_cooling_down(p)
    assert 0 < fake_redis.pttl(COOLDOWN_KEY.format(provider_id="p1")) <= 30_000
    assert not fake_redis.exists(FAILURES_KEY.format(provider_id="p1"))


def test_old_failures_leave_the_window(fake_redis: fakeredis.FakeRedis, clock: Clock) -> None:
    gate, p = RedisCooldowns(fake_redis), provider()
    gate.record_failure(p)
    gate.record_failure(p)
    clock.now += 61
    gate.record_failure(p)
    assert not gate.is_cooling_down(p)
    assert 0 < fake_redis.ttl(FAILURES_KEY.format(provider_id="p1")) <= 61


def test_zero_failures_turns_cooldown_off(fake_redis: fakeredis.FakeRedis, clock: Clock) -> None:
    gate, p = RedisCooldowns(fake_redis), provider(cooldown_failures=0)
    for _ in range(10):
        gate.record_failure(p)
    assert not gate.is_cooling_down(p)
    assert fake_redis.keys("cascade:cooldown*") == []


def test_scripted_providers_do_not_cool_down_by_default(fake_redis: fakeredis.FakeRedis, clock: Clock) -> None:
    gate, p = RedisCooldowns(fake_redis), build_provider("p1", ScriptedConfig(text="x", fail="auth"))
    for _ in range(10):
        gate.record_failure(p)
    assert not gate.is_cooling_down(p)


def test_a_running_cooldown_is_not_extended(fake_redis: fakeredis.FakeRedis, clock: Clock) -> None:
    gate, p = RedisCooldowns(fake_redis), provider(cooldown_failures=1, cooldown_s=30.0)
    key = COOLDOWN_KEY.format(provider_id="p1")
    gate.record_failure(p)
    fake_redis.pexpire(key, 5_000)  # as if 25 s of the cooldown had passed
    gate.record_failure(p)
    assert 0 < fake_redis.pttl(key) <= 5_000


def test_cooldowns_are_per_provider(fake_redis: fakeredis.FakeRedis, clock: Clock) -> None:
    gate = RedisCooldowns(fake_redis)
    a = provider(cooldown_failures=1)
    b = build_provider("p2", ScriptedConfig(text="x", cooldown_failures=1))
    gate.record_failure(a)
    assert gate.is_cooling_down(a)
    assert not gate.is_cooling_down(b)
