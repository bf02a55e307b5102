"""The fault suite's hooks: worker logs on failure, leftover processes killed by pid, and the
figures of the run (recovery times, the load run) printed as the suite's last lines; and the
fixtures its modules share: one password-protected ``RedisServer`` per module (``server``) and a
client of it, flushed for each test (``rdb``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.support.redis_server import RedisServer
from tests.support.worker_process import with_worker_logs

from .harness import REDIS_PASSWORD, STARTED
from .report import FIGURES, LOAD_FIGURES, LOAD_REPORT


@pytest.fixture(scope="session", autouse=True)
def _stop_leftover_workers() -> Iterator[None]:
    yield
    for started in STARTED:
        started.stop()


@pytest.fixture(scope="module", autouse=True)
def _first_worker_of_module(request: pytest.FixtureRequest) -> None:
    """Remember which workers this module starts, so a failure shows only their logs."""
    request.module._faults_first_worker = len(STARTED)


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A ``RedisServer`` with the suite's password, one for each test module that asks for it."""
    name = request.module.__name__.rpartition(".")[2].removeprefix("test_")
    started = RedisServer(tmp_path_factory.mktemp(f"{name}-redis"), password=REDIS_PASSWORD).start()
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def rdb(server: RedisServer) -> Iterator[redis.Redis]:
    """A client of the module's ``server``, which is flushed before the test."""
    client = redis.Redis.from_url(server.url)
    client.flushall()
    try:
        yield client
    finally:
        client.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    first = getattr(getattr(item, "module", None), "_faults_first_worker", len(STARTED))
    return with_worker_logs(report, STARTED[first:], lines=80)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not (FIGURES or LOAD_FIGURES):
        return
    terminalreporter.section("fault suite figures")
    for name, value in FIGURES.items():
        terminalreporter.write_line(f"{name}: {value}")
    if LOAD_FIGURES:
        terminalreporter.write_line(f"load run (also in {LOAD_REPORT}):")
        for name, value in LOAD_FIGURES.items():
            terminalreporter.write_line(f"  {name}: {value}")
