"""Redis going silent under a running request: every open connection stops answering without a
word (no FIN, no RST), as when a primary's machine is lost and a failover gives new connections
a new primary. A TCP proxy between the worker and Redis (``blackhole.BlackholeProxy``) swallows
what the old connections carry from then on.

Without a socket timeout the request thread, the lease heartbeat and the reaper would wait on
their dead connections forever. With one (``CASCADE_REDIS_SOCKET_TIMEOUT_S``), each command on a
dead connection fails after that long and is tried again on a new connection, so the run goes
on and ends with its reply.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tasks.producer.client import CascadeClient
from tests.support.redis_server import RedisServer

from .blackhole import BlackholeProxy
from .harness import (
    REQUEST_TIMEOUT_S,
    FaultWorker,
    assert_coherent,
    new_id,
    stored_events,
    stored_reply,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.faults

# 20 chunks 150 ms apart: about 3 s, long enough to silence Redis mid-stream.
TEXT = " ".join(f"bit{i:02d}" for i in range(20))
PROVIDERS = {"paced": {"type": "scripted", "text": TEXT, "chunk_size": 6, "chunk_delay_ms": 150}}
# A short socket timeout, well inside the lease's TTL (10 s by default): the run gets its
# connection back before its lease could lapse, so it is the one that answers.
ENV = {"CASCADE_REDIS_SOCKET_TIMEOUT_S": "2", "CASCADE_REDIS_CONNECT_TIMEOUT_S": "2"}


@pytest.fixture
def proxy(server: RedisServer) -> Iterator[BlackholeProxy]:
    started = BlackholeProxy(server.port).start()
    try:
        yield started
    finally:
        started.close()


def test_a_request_running_when_redis_goes_silent_still_ends(
    tmp_path_factory: pytest.TempPathFactory, rdb: redis.Redis, proxy: BlackholeProxy, server: RedisServer
) -> None:
    workdir = tmp_path_factory.mktemp("silent-redis")
    config = write_config(workdir / "cascade.toml", PROVIDERS, {"default": ["paced"]})
    worker = FaultWorker("S", proxy.url(server.url), config, workdir / "worker-S.log", env=dict(ENV)).start()
    try:
        request_id = new_id("silent")
        with CascadeClient(server.url) as client:  # the producer talks to Redis directly
            client.submit(request_id=request_id, prompt="Say something long.", chain="default")
        wait_until(
            lambda: sum(e.type == "chunk" for e in stored_events(rdb, request_id)) >= 3,
            timeout_s=REQUEST_TIMEOUT_S,
            what="the request streams",
        )
        assert proxy.silence() > 0, "the worker's connections go through the proxy"

        reply = wait_until(
            lambda: stored_reply(rdb, request_id), timeout_s=REQUEST_TIMEOUT_S, what="the run ends with its reply"
        )
        events = stored_events(rdb, request_id)
        assert_coherent(events, reply, request_id)
        assert reply.status == "succeeded" and reply.replies[0].content == TEXT
        assert [(a.provider, a.outcome) for a in reply.meta.attempts] == [("paced", "succeeded")]
        worker.assert_alive()
    finally:
        worker.stop()
