"""Per-process state under a threads pool: built once however many threads ask, and the
providers warmed up in the main process when no ``worker_process_init`` comes."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from celery.concurrency.prefork import TaskPool as PreforkPool
from celery.concurrency.solo import TaskPool as SoloPool
from celery.concurrency.thread import TaskPool as ThreadPool

from worker import signals
from worker.runtime import once_per_process


def test_concurrent_first_calls_build_once_and_share_the_result() -> None:
    builds: list[int] = []
    gate = threading.Barrier(8)

    @once_per_process
    def slow() -> object:
        builds.append(threading.get_ident())
        time.sleep(0.05)  # long enough for every other thread to arrive while it builds
        return object()

    def first_call() -> object:
        gate.wait(timeout=10)
        return slow()

    with ThreadPoolExecutor(8) as pool:
        results = [future.result(timeout=10) for future in [pool.submit(first_call) for _ in range(8)]]
    assert len(builds) == 1
    assert all(result is results[0] for result in results)
    assert slow() is results[0]


def test_a_failed_build_is_tried_again_on_the_next_call() -> None:
    attempts: list[int] = []

    @once_per_process
    def flaky() -> int:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("redis not there yet")
        return 42

    with pytest.raises(RuntimeError):
        flaky()
    assert flaky() == 42 and flaky() == 42
    assert len(attempts) == 2


class FakeConsumer:
    def __init__(self, pool: Any) -> None:
        self.pool = pool


@pytest.mark.parametrize(
    ("pool_class", "warms_in_main"),
    [(ThreadPool, True), (PreforkPool, False), (SoloPool, False)],
)
def test_only_pools_without_process_init_warm_up_in_the_main_process(
    monkeypatch: pytest.MonkeyPatch, pool_class: type, warms_in_main: bool
) -> None:
    warmed: list[bool] = []
    monkeypatch.setattr(signals, "warm_up_providers", lambda **_: warmed.append(True))
    pool = pool_class.__new__(pool_class)  # the class is what matters; nothing is started
    signals.warm_up_in_main_process(sender=FakeConsumer(pool))
    assert warmed == ([True] if warms_in_main else [])
    assert signals.sends_process_init(pool) is not warms_in_main


def test_a_sender_without_a_pool_warms_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    warmed: list[bool] = []
    monkeypatch.setattr(signals, "warm_up_providers", lambda **_: warmed.append(True))
    signals.warm_up_in_main_process(sender=None)
    assert warmed == []
