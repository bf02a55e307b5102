"""Process harness of the integration tests: real Celery workers on one real ``redis-server``
(``tests.support.redis_server.RedisServer``, with keyspace notifications: see conftest.py).

A worker is ``worker.demo.local.start_worker``'s process (as the demo and the system tests start
it) in its own process group, logging to a file, named, ready once a warm-up request got its
reply, and stopped by its pid. Every wait is bounded."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import redis

from tasks.contract.schemas import ChatReply, StreamEvent
from tasks.producer.client import CascadeClient
from tests.support.config import write_config as write_config
from tests.support.stack import REPO
from tests.support.stored import dead_letters as dead_letters
from tests.support.stored import published_events as published_events
from tests.support.stored import stored_events as stored_events
from tests.support.stored import stored_reply as stored_reply
from tests.support.stream_contract import assert_coherent
from tests.support.stream_contract import assert_well_formed as assert_well_formed
from tests.support.stream_contract import reconstruct_text as reconstruct_text
from tests.support.waiting import wait_until as poll_until
from tests.support.worker_process import WorkerProcess
from worker.demo.local import start_worker, stop_process

WORKER_START_TIMEOUT_S = 30.0
WORKER_STOP_TIMEOUT_S = 20.0
# The longest any single request of the suite may take to reach its terminal event.
REQUEST_TIMEOUT_S = 20.0

T = TypeVar("T")

# Every worker started in this session, so a failing test can show their logs.
STARTED_WORKERS: list[Worker] = []


def new_id() -> str:
    """A fresh request id."""
    return uuid.uuid4().hex


def wait_until(predicate: Callable[[], T], *, timeout_s: float, interval_s: float = 0.02, what: str = "condition") -> T:
    """``tests.support.waiting.wait_until``, polling every 20 ms unless told otherwise."""
    return poll_until(predicate, timeout_s=timeout_s, interval_s=interval_s, what=what)


# --- Celery worker -----------------------------------------------------------------------------


@dataclass
class Worker(WorkerProcess):
    """One ``celery -A worker worker -Q chat`` process (prefork pool) in its own process group,
    started by ``worker.demo.local.start_worker`` and ready once a warm-up request got its reply."""

    redis_url: str
    config_path: Path
    log_path: Path
    name: str = "cascade-test"
    concurrency: int = 2
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self, *, warm_up_chain: str = "default") -> Worker:
        # Only this worker's own CASCADE_* settings: none leak in from the calling shell.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        STARTED_WORKERS.append(self)
        with self.log_path.open("ab") as log:
            self.proc = start_worker(
                self.redis_url,
                self.config_path,
                concurrency=self.concurrency,
                log=log,
                extra_env={"PYTHONUNBUFFERED": "1", **self.env},
                cwd=REPO,
                name=self.name,
                base_env=inherited,
            )
        try:
            self._wait_ready(warm_up_chain)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, chain: str) -> None:
        """Ready = a trivial request through ``chain`` got its reply (proves broker, pool, Redis)."""
        client = CascadeClient(self.redis_url)
        try:
            request_id = client.submit(prompt="warm up", chain=chain)
            give_up = time.monotonic() + WORKER_START_TIMEOUT_S
            while True:
                self.assert_alive()
                try:
                    reply = client.wait(request_id, timeout_s=0.5)
                except TimeoutError:
                    reply = None
                if reply is not None:
                    if reply.status != "succeeded":
                        raise RuntimeError(f"warm-up request failed: {reply.error}\n{self.log_tail()}")
                    return
                if time.monotonic() >= give_up:
                    raise RuntimeError(
                        f"worker {self.name} not ready within {WORKER_START_TIMEOUT_S} s\n{self.log_tail()}"
                    )
        finally:
            client.close()

    def stop(self) -> None:
        """SIGTERM the main process (a warm shutdown), then SIGKILL its group: no pool child survives."""
        if self.proc is not None:
            stop_process(self.proc, WORKER_STOP_TIMEOUT_S, term_group=False, sweep=True)


# --- reading what a request produced -------------------------------------------------------------


def collect_events(client: CascadeClient, request_id: str, timeout_s: float = REQUEST_TIMEOUT_S) -> list[StreamEvent]:
    """Every event of ``request_id`` up to its terminal event (bounded by ``timeout_s``)."""
    return list(client.events(request_id, timeout_s=timeout_s))


def dead_letters_for(client: redis.Redis, ident: str) -> list[dict[str, Any]]:
    """The dead letters whose request id or task id is ``ident``."""
    return [entry for entry in dead_letters(client) if ident in (entry.get("request_id"), entry.get("task_id"))]


def wait_for_subscription(pubsub: Any, timeout_s: float = 5.0) -> None:
    """Block until Redis confirmed the pending SUBSCRIBE of ``pubsub`` (bounded)."""
    give_up = time.monotonic() + timeout_s
    while time.monotonic() < give_up:
        message = pubsub.get_message(timeout=0.1)
        if message is not None and message["type"] in ("subscribe", "psubscribe"):
            return
    raise TimeoutError(f"no subscription confirmation within {timeout_s} s")


class KeyWrites:
    """Counts writes (SET) of one key through keyspace notifications (Redis runs with ``K$``)."""

    def __init__(self, client: redis.Redis, key: str) -> None:
        db = client.connection_pool.connection_kwargs.get("db", 0)
        self._pubsub = client.pubsub()
        self._pubsub.subscribe(f"__keyspace@{db}__:{key}")
        # Wait for the subscription to be confirmed before the caller triggers any write.
        wait_for_subscription(self._pubsub)
        self.events: list[str] = []

    def drain(self, settle_s: float = 0.2) -> list[str]:
        give_up = time.monotonic() + settle_s
        while time.monotonic() < give_up:
            message = self._pubsub.get_message(timeout=0.05)
            if message and message["type"] == "message":
                data = message["data"]
                self.events.append(data.decode() if isinstance(data, bytes) else str(data))
        return self.events

    def close(self) -> None:
        self._pubsub.close()


@dataclass
class Outcome:
    """What one request produced: its id, its events (replayed from seq 0) and its stored reply."""

    request_id: str
    events: list[StreamEvent]
    reply: ChatReply

    def types(self) -> list[str]:
        return [e.type for e in self.events]

    def of_type(self, event_type: str) -> list[StreamEvent]:
        return [e for e in self.events if e.type == event_type]

    def attempts(self) -> list[tuple[str, str, str | None]]:
        """``(provider, outcome, error_type)`` of each attempt in the reply meta."""
        return [(a.provider, a.outcome, a.error_type) for a in self.reply.meta.attempts]


def run_request(client: CascadeClient, *, expect_start: bool = True, **fields: Any) -> Outcome:
    """Submit a request, follow it to its terminal event and check the stream protocol."""
    request_id = client.submit(**fields)
    return follow(client, request_id, expect_start=expect_start, streamed=fields.get("stream", True))


def follow(client: CascadeClient, request_id: str, *, expect_start: bool = True, streamed: bool = True) -> Outcome:
    """Follow ``request_id`` to its terminal event; check the protocol and the stored reply."""
    events = collect_events(client, request_id)
    stored = stored_reply(client.redis, request_id)
    reply = assert_coherent(events, stored, request_id, expect_start=expect_start, streamed=streamed)
    assert reply.request_id == request_id
    return Outcome(request_id, events, reply)
