"""Redis going away under running workers.

- ``CLIENT KILL TYPE normal`` mid-request drops every client connection (the workers' broker
  connections, their pool's Redis client, the producer's): the request still runs once — one
  reply, one terminal event, the chunks of one run with attempt numbers that never restart.
- Redis restarted (AOF on, same port and directory): the workers and the producer reconnect by
  themselves, nobody restarts a worker, and the requests enqueued before the restart (running or
  still queued) and those sent after it complete, each with exactly one reply and one coherent
  stream.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tasks.contract.schemas import ChatReply, StreamEvent
from tasks.producer.client import CascadeClient
from tests.support.redis_server import RedisServer

from .harness import (
    REDIS_PASSWORD,
    REQUEST_TIMEOUT_S,
    FaultWorker,
    Follower,
    ReplyWrites,
    assert_coherent,
    assert_no_secrets,
    new_id,
    stored_events,
    stored_reply,
    wait_until,
    write_config,
)
from .report import record

pytestmark = pytest.mark.faults

TEXT = " ".join(f"part{i:02d}" for i in range(20))
PROVIDERS = {
    # 20 chunks 150 ms apart (about 3 s): long enough to cut the connections mid-stream.
    "paced": {"type": "scripted", "text": TEXT, "chunk_size": 7, "chunk_delay_ms": 150},
    # About 0.8 s: a backlog of these is partly running, partly queued when Redis restarts.
    "brisk": {"type": "scripted", "text": TEXT, "chunk_size": 14, "chunk_delay_ms": 80},
}
CHAINS = {"default": ["paced"], "brisk": ["brisk"]}
# Leases of 3 s: a Redis restart may outlast a lease; then the rerun must still be coherent.
ENV = {"CASCADE_LEASE_TTL_S": "3", "CASCADE_REAPER_INTERVAL_S": "0.5"}
RESTART_BACKLOG = 6
AFTER_RESTART = 2


@dataclass
class Stack:
    workdir: Path
    server: RedisServer
    workers: list[FaultWorker]
    rdb: redis.Redis
    restarts: int = 0

    @property
    def url(self) -> str:
        return self.server.url

    def restart_redis(self) -> float:
        """Restart Redis on the same port and directory (its AOF kept); return how long it was away."""
        self.restarts += 1
        return self.server.restart()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("redis-faults")
    config = write_config(workdir / "cascade.toml", PROVIDERS, CHAINS)
    server = RedisServer(workdir / "redis", password=REDIS_PASSWORD, appendonly=True).start()
    workers = [FaultWorker(name, server.url, config, workdir / f"worker-{name}.log", env=dict(ENV)) for name in "AB"]
    stack = Stack(workdir, server, workers, redis.Redis.from_url(server.url))
    try:
        for started in workers:
            started.launch()
        for started in workers:
            started.wait_ready()
        yield stack
    finally:
        for started in workers:
            started.stop()
        stack.rdb.close()
        server.stop()


def follow_and_check(stack: Stack, request_id: str, events: list[StreamEvent] | None = None) -> ChatReply:
    """The request's stream is one coherent answer and its reply is stored."""
    with CascadeClient(stack.url) as client:
        followed = events if events is not None else list(client.events(request_id, timeout_s=REQUEST_TIMEOUT_S))
    reply = stored_reply(stack.rdb, request_id)
    assert followed == stored_events(stack.rdb, request_id)
    return assert_coherent(followed, reply, request_id)


def test_client_kill_mid_request_does_not_run_it_twice(stack: Stack) -> None:
    writes = ReplyWrites(stack.rdb)
    try:
        request_id = new_id("cut")
        follower = Follower(stack.url, request_id)
        with CascadeClient(stack.url) as client:
            client.submit(request_id=request_id, prompt="Say something long.", chain="default")
        chunks = lambda: sum(e.type == "chunk" for e in stored_events(stack.rdb, request_id))  # noqa: E731
        wait_until(lambda: chunks() >= 3, timeout_s=REQUEST_TIMEOUT_S, what="the request streams")

        # Every normal client (both workers' broker connections and Redis clients, the
        # producer's): killed mid-request, and once more a moment later.
        killed = int(stack.rdb.execute_command("CLIENT", "KILL", "TYPE", "normal"))
        wait_until(lambda: chunks() >= 8, timeout_s=REQUEST_TIMEOUT_S, what="the request streams on")
        killed += int(stack.rdb.execute_command("CLIENT", "KILL", "TYPE", "normal"))
        assert killed >= 4, "the workers' connections were cut"

        events = follower.result(timeout_s=REQUEST_TIMEOUT_S)
        reply = follow_and_check(stack, request_id, events)
        assert reply.status == "succeeded" and reply.replies[0].content == TEXT
        # One run: attempt 1 only, no fallback, started and finished by the same process.
        assert {e.attempt for e in events if e.type == "chunk"} == {1}
        assert not [e for e in events if e.type == "fallback"]
        assert [(a.provider, a.attempt, a.outcome) for a in reply.meta.attempts] == [("paced", 1, "succeeded")]
        assert reply.meta.worker == events[0].worker

        # A redelivered copy (the broker channel was lost before the ack) finds the reply or
        # the lease and never runs: the stream and the reply stay as they are.
        settle_s = 4.0  # longer than a lease (3 s) plus a reaper pass
        time.sleep(settle_s)
        assert stored_events(stack.rdb, request_id) == events
        assert writes.sets_of(request_id) == ["set"], "exactly one reply written"
        dropped = sum(f"request {request_id} is running on another worker" in w.log_text() for w in stack.workers)
        record("CLIENT KILL mid-request: connections cut, copies dropped", f"{killed}, {dropped}")
    finally:
        writes.close()

    # Both workers still serve.
    with CascadeClient(stack.url) as client:
        after = [client.submit(prompt="again", chain="brisk") for _ in range(2)]
        for request_id in after:
            assert client.wait(request_id, timeout_s=REQUEST_TIMEOUT_S).status == "succeeded"


def test_redis_restart_with_aof_loses_nothing(stack: Stack) -> None:
    pids = [(w.pid, w.pool_pids()) for w in stack.workers]
    with CascadeClient(stack.url) as producer:
        before = [producer.submit(prompt=f"before {n}", chain="brisk") for n in range(RESTART_BACKLOG)]
        wait_until(
            lambda: any(stored_events(stack.rdb, request_id) for request_id in before),
            timeout_s=REQUEST_TIMEOUT_S,
            what="the backlog starts",
        )
        away_s = stack.restart_redis()
        answered_before_restart = sum(stored_reply(stack.rdb, request_id) is not None for request_id in before)
        assert answered_before_restart < RESTART_BACKLOG, "the backlog was still running when Redis went away"

        # The same producer, after the restart: its connections reconnect by themselves.
        after = [producer.submit(prompt=f"after {n}", chain="brisk") for n in range(AFTER_RESTART)]
        recovered_at = time.monotonic()
        replies = {
            request_id: producer.wait(request_id, timeout_s=60) for request_id in before + after
        }  # bounded: each wait is 60 s at most
        recovered_s = time.monotonic() - recovered_at

    for request_id, reply in replies.items():
        assert reply.status == "succeeded", (request_id, reply.error)
        assert reply.replies[0].content == TEXT
        follow_and_check(stack, request_id)
    # Nobody restarted a worker by hand: the same processes served before and after.
    assert [(w.pid, w.pool_pids()) for w in stack.workers] == pids
    assert all(w.starts == 1 and w.alive() for w in stack.workers)
    reruns = sum(
        any(e.type == "fallback" and e.error_type == "worker_lost" for e in stored_events(stack.rdb, request_id))
        for request_id in replies
    )
    backlog = f"{RESTART_BACKLOG - answered_before_restart}/{RESTART_BACKLOG}"
    record(
        "Redis restart (AOF): away, backlog answered after it, resumed runs",
        f"{away_s:.1f} s, {backlog} in {recovered_s:.1f} s, {reruns}",
    )


def test_no_secret_in_anything_the_redis_faults_produced(stack: Stack) -> None:
    assert_no_secrets(stack.rdb, [w.log_path for w in stack.workers])
