"""Worker start-up (``worker.signals``, ``worker.celery_app``): each pool process warms up the
providers of the queues its worker consumes — and only those — and a provider that cannot be
built does not kill the process; Celery waits for a slow warm-up instead of killing it; the
chain routes a worker publishes are those of its configuration, no stale ones; what warm-up
leaves on the heap is frozen out of the garbage collector's reach, after everything warm-up
builds (a pool process's init, or the main process's for a threads pool)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
from celery.signals import worker_process_init

from providers import registry
from providers.base import ChatProvider
from settings import ScriptedConfig, Settings
from settings.providers import HfLocalConfig, OpenAIImageConfig
from tasks.contract.keys import ROUTES
from worker import signals
from worker.celery_app import create_app
from worker.runtime import build_runtime
from worker.telemetry import hooks


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ids of the providers built, in order (a build of ``broken`` raises)."""
    ids: list[str] = []
    real_build = registry.build_provider

    def recording(provider_id: str, config: Any) -> ChatProvider:
        ids.append(provider_id)
        if provider_id == "broken":
            raise RuntimeError("missing API key (injected)")
        return real_build(provider_id, config)

    monkeypatch.setattr(registry, "build_provider", recording)
    return ids


def use_runtime(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    runtime = build_runtime(settings, fakeredis.FakeRedis(), worker_name="signals/1")
    monkeypatch.setattr(signals, "get_runtime", lambda: runtime)
    monkeypatch.setattr(signals, "consumed_queues", lambda _app: frozenset({"chat"}))


def test_a_pool_process_builds_the_providers_of_its_queues_only(
    monkeypatch: pytest.MonkeyPatch, built: list[str]
) -> None:
    settings = Settings(
        providers={
            "api": ScriptedConfig(text="hi"),
            "gpu": HfLocalConfig(model="/nowhere", queue="chat.gpu"),  # another worker's model
        },
        chains={"default": ["api", "gpu"]},
    )
    use_runtime(monkeypatch, settings)
    signals.warm_up_providers()
    assert built == ["api"]


def test_a_provider_that_cannot_be_built_is_logged_not_fatal(
    monkeypatch: pytest.MonkeyPatch, built: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(
        providers={"broken": ScriptedConfig(text="x"), "fine": ScriptedConfig(text="y")},
        chains={"default": ["broken", "fine"]},
    )
    use_runtime(monkeypatch, settings)
    with caplog.at_level("ERROR"):
        signals.warm_up_providers()
    assert built == ["broken", "fine"]
    assert "could not warm up broken" in caplog.text


def test_celery_waits_for_a_slow_warm_up() -> None:
    assert create_app(Settings()).conf.worker_proc_alive_timeout == Settings().warm_up_timeout_s == 600
    assert create_app(Settings(warm_up_timeout_s=30)).conf.worker_proc_alive_timeout == 30


def test_the_routes_are_those_of_the_current_chains(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(
        providers={"api": ScriptedConfig(text="hi"), "gpu": HfLocalConfig(model="/nowhere", queue="chat.gpu")},
        chains={"default": ["api", "gpu"], "local": ["gpu"]},
    )
    use_runtime(monkeypatch, settings)
    client = signals.get_runtime().redis
    client.hset(ROUTES, mapping={"removed": "chat.old", "local": "chat"})  # from an earlier deploy
    signals.publish_chain_routes()
    assert client.hgetall(ROUTES) == {b"default": b"chat", b"local": b"chat.gpu"}
    assert 0 < client.ttl(ROUTES) <= signals.ROUTES_TTL_S


def test_image_chains_get_routes_as_chat_chains_do(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(
        providers={"api": ScriptedConfig(text="hi"), "painter": OpenAIImageConfig(model="dall-e-3", queue="images")},
        chains={"default": ["api"], "images": ["painter"]},
    )
    use_runtime(monkeypatch, settings)
    signals.publish_chain_routes()
    assert signals.get_runtime().redis.hgetall(ROUTES) == {b"default": b"chat", b"images": b"images"}


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """A heap with nothing frozen, and nothing left frozen for the next test."""
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_a_pool_process_freezes_its_heap_after_everything_its_init_builds(unfrozen: None) -> None:
    receivers = [r() if isinstance(r, weakref.ReferenceType) else r for _key, r in worker_process_init.receivers]
    frozen_at = receivers.index(signals.freeze_warm_heap)
    assert receivers.index(signals.warm_up_providers) < frozen_at
    assert receivers.index(hooks.setup_task_process) < frozen_at
    signals.freeze_warm_heap()
    assert gc.get_freeze_count() > 0


class _ThreadsPool:
    """Stands in for ``-P threads``: a pool that runs tasks in the main process."""


_ThreadsPool.__module__ = "celery.concurrency.thread"


class _Worker:
    def __init__(self, pool: Any) -> None:
        self.pool = pool


def test_a_threads_pool_freezes_the_main_process_after_warm_up(
    monkeypatch: pytest.MonkeyPatch, built: list[str], unfrozen: None
) -> None:
    use_runtime(monkeypatch, Settings(providers={"api": ScriptedConfig(text="hi")}, chains={"default": ["api"]}))
    frozen_at_build: list[int] = []
    real_build = registry.build_provider

    def noting(provider_id: str, config: Any) -> ChatProvider:
        frozen_at_build.append(gc.get_freeze_count())
        return real_build(provider_id, config)

    monkeypatch.setattr(registry, "build_provider", noting)
    signals.warm_up_in_main_process(sender=_Worker(_ThreadsPool()))
    assert frozen_at_build == [0]  # built first, then frozen
    assert gc.get_freeze_count() > 0


def test_a_prefork_main_process_neither_warms_up_nor_freezes(built: list[str], unfrozen: None) -> None:
    from celery.concurrency.prefork import TaskPool

    signals.warm_up_in_main_process(sender=_Worker(TaskPool.__new__(TaskPool)))
    assert built == []
    assert gc.get_freeze_count() == 0
