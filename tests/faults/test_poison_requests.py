"""Poison requests against a real redis-server and a real worker: a request whose run kills its
pool process (the scripted provider's ``fail = "crash"``: ``os._exit`` mid-stream, as an OOM
kill or a segfault) is resumed after each death until the third, then ends ``failed`` with error
type ``worker_lost`` — a stored reply, a terminal ``error`` event and a dead letter — and never
runs again, while the worker goes on serving other requests. Resumes keep the first run's
deadline: a request whose deadline passed meanwhile ends ``deadline_exceeded``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from tasks.contract import keys
from tasks.contract.keys import deaths_key
from tasks.contract.schemas import ChatReply, StreamEvent
from tasks.producer.client import CascadeClient
from tests.support.redis_server import RedisServer

from .harness import (
    FAST_RECOVERY_ENV,
    REQUEST_TIMEOUT_S,
    FaultWorker,
    assert_coherent,
    dead_letters,
    new_id,
    stored_events,
    stored_reply,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.faults

PROVIDERS = {
    # Two chunks, then the pool process exits.
    "crasher": {
        "type": "scripted",
        "text": "one two three four",
        "chunk_size": 4,
        "chunk_delay_ms": 50,
        "fail": "crash",
        "fail_after_chunks": 2,
    },
    "steady": {"type": "scripted", "text": "all is well", "chunk_size": 4},
}
CHAINS = {"poison": ["crasher"], "default": ["steady"]}
# Three deaths, each found once its lease (2 s) lapsed, plus a new pool process each time.
POISON_BOUND_S = 90.0


@dataclass
class Stack:
    url: str
    rdb: redis.Redis
    worker: FaultWorker

    def submit(self, chain: str, **fields: Any) -> str:
        request_id = new_id(chain)
        with CascadeClient(self.url) as client:
            client.submit(request_id=request_id, prompt="Go.", chain=chain, **fields)
        return request_id

    def reply(self, request_id: str, timeout_s: float) -> ChatReply:
        return wait_until(
            lambda: stored_reply(self.rdb, request_id), timeout_s=timeout_s, what=f"the reply of {request_id}"
        )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, server: RedisServer) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("poison")
    config = write_config(workdir / "cascade.toml", PROVIDERS, CHAINS)
    worker = FaultWorker("P", server.url, config, workdir / "worker-P.log", env=dict(FAST_RECOVERY_ENV))
    rdb = redis.Redis.from_url(server.url)
    try:
        yield Stack(server.url, rdb, worker.start())
    finally:
        worker.stop()
        rdb.close()


def runs_of(events: list[StreamEvent]) -> list[int]:
    """The attempts that streamed chunks: one per run of the crashing provider."""
    return sorted({e.attempt for e in events if e.type == "chunk" and e.attempt is not None})


def test_a_request_that_kills_its_worker_ends_after_three_deaths(stack: Stack) -> None:
    request_id = stack.submit("poison")
    reply = stack.reply(request_id, POISON_BOUND_S)

    events = stored_events(stack.rdb, request_id)
    assert_coherent(events, reply, request_id)
    assert reply.status == "failed" and reply.error is not None and reply.error.type == "worker_lost"
    assert int(stack.rdb.hget(deaths_key(request_id), "deaths") or 0) == 3, "three deaths counted"
    runs = runs_of(events)
    assert len(runs) >= 3, f"the first run and (at least) two resumes: {runs}"
    fallbacks = [(e.attempt, e.error_type) for e in events if e.type == "fallback"]
    assert fallbacks == [(attempt, "worker_lost") for attempt in runs[:-1]], "each resume voided the dead run"
    assert {a.error_type for a in reply.meta.attempts} == {"worker_lost"}
    letters = [d for d in dead_letters(stack.rdb) if d.get("request_id") == request_id]
    assert [d["reason"] for d in letters] == ["worker_lost"]
    assert json.loads(letters[0]["body"])["request"]["request_id"] == request_id

    # The worker lives on and serves the next request; the poison one never runs again.
    after = stack.submit("default")
    answered = stack.reply(after, REQUEST_TIMEOUT_S)
    assert answered.status == "succeeded" and answered.replies[0].content == "all is well"
    stack.worker.assert_alive()
    assert stored_events(stack.rdb, request_id) == events
    assert stored_reply(stack.rdb, request_id) == reply
    assert not stack.rdb.exists(keys.cancel_key(request_id))


def test_resumes_keep_the_first_runs_deadline(stack: Stack) -> None:
    """A deadline of 1 s passes before the dead run's lease (2 s) even lapses: the request ends
    ``deadline_exceeded`` instead of running again with a fresh deadline of its own."""
    request_id = stack.submit("poison", timeout_s=1)
    reply = stack.reply(request_id, POISON_BOUND_S)

    events = stored_events(stack.rdb, request_id)
    assert_coherent(events, reply, request_id)
    assert reply.status == "failed" and reply.error is not None and reply.error.type == "deadline_exceeded"
    assert int(stack.rdb.hget(deaths_key(request_id), "deaths") or 0) < 3
    assert not [d for d in dead_letters(stack.rdb) if d.get("request_id") == request_id]
