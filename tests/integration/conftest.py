"""Fixtures of the integration tests: one real ``redis-server`` and one real Celery worker per
session (plus extra workers some modules start on their own Redis database).

Nothing is flushed between tests: each test uses fresh request ids (uuid4 hex).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from tasks.producer.client import CascadeClient
from tests.support.redis_server import RedisServer
from tests.support.worker_process import with_worker_logs

from .harness import STARTED_WORKERS, Worker, write_config
from .scenarios import MAX_INPUT_CHARS, MAX_MESSAGES, chain_table, provider_table


@pytest.fixture(scope="session")
def integration_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cascade-integration")


@pytest.fixture(scope="session")
def redis_server(integration_dir: Path) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, stopped by pid at the end, with keyspace
    notifications for strings on (K: keyspace events, $: string commands), so tests can count
    the writes of a key."""
    server = RedisServer(integration_dir / "redis", extra_args=("--notify-keyspace-events", "K$")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def cascade_config(integration_dir: Path) -> Path:
    """The worker TOML file with every scenario's providers and chains."""
    return write_config(integration_dir / "cascade.toml", provider_table(), chain_table())


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture(scope="session")
def worker(redis_url: str, cascade_config: Path, integration_dir: Path) -> Iterator[Worker]:
    """THE worker of the session: ``celery -A worker worker -Q chat -c 2`` on database 0."""
    started = Worker(
        redis_url=redis_url,
        config_path=cascade_config,
        log_path=integration_dir / "worker-main.log",
        name="cascade-main",
        env={
            "CASCADE_MAX_MESSAGES": str(MAX_MESSAGES),
            "CASCADE_MAX_INPUT_CHARS": str(MAX_INPUT_CHARS),
            # These tests count one event per provider chunk; coalescing (2 ms by default) has
            # its own tests (tests/unit/test_coalescing.py) and the system suites run with it.
            "CASCADE_COALESCE_MS": "0",
        },
    ).start()
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def client(worker: Worker, redis_url: str) -> Iterator[CascadeClient]:
    """A producer client in the test process, talking to the session worker's Redis."""
    with CascadeClient(redis_url) as producer:
        yield producer
    worker.assert_alive()


@pytest.fixture(scope="module")
def producer(redis_url: str) -> Iterator[Celery]:
    """A bare Celery producer: the test controls the raw task payload (the Python client refuses
    a bad request before sending it)."""
    app = Celery("integration-producer", broker=redis_url, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"])
    try:
        yield app
    finally:
        app.close()


@pytest.fixture
def rdb(redis_url: str) -> Iterator[redis.Redis]:
    """A raw Redis client on database 0."""
    connection = redis.Redis.from_url(redis_url)
    try:
        yield connection
    finally:
        connection.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    return with_worker_logs(report, STARTED_WORKERS, lines=120)
