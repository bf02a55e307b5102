"""A provider's outage and its recovery, through a real worker: an ``openai`` provider pointed at
a fake OpenAI server that answers 500 for a while, in the chain ``[primary, backup]``.

Traffic falls through to the backup; after ``cooldown_failures`` failures the cooldown trips
(``cascade:cooldown:primary``; the primary is then skipped without a call, recorded as
``skipped`` / ``provider_unavailable``); the server recovers, and once the cooldown expired the
traffic returns to the primary.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis

from tasks.contract.keys import cooldown_key
from tasks.contract.schemas import ChatReply
from tasks.producer.client import CascadeClient
from tests.providers.openai_wire import chat_stream, error_reply
from tests.support.fake_http import FakeHTTPServer, Reply
from tests.support.redis_server import RedisServer

from .harness import (
    PROVIDER_SECRETS,
    REDIS_PASSWORD,
    REQUEST_TIMEOUT_S,
    FaultWorker,
    assert_coherent,
    assert_no_secrets,
    stored_events,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.faults

BACKUP_TEXT = "The backup answers while the primary is down."
PRIMARY_PIECES = ("The primary ", "is back ", "in service.")
COOLDOWN_FAILURES = 3
COOLDOWN_S = 3.0


@dataclass
class Outage:
    server: FakeHTTPServer
    client: CascadeClient
    rdb: redis.Redis
    worker: FaultWorker

    def ask(self) -> ChatReply:
        request_id = self.client.submit(prompt="What is the status?", generation_kwargs={"max_tokens": 16})
        reply = self.client.wait(request_id, timeout_s=REQUEST_TIMEOUT_S)
        assert_coherent(stored_events(self.rdb, request_id), reply, request_id)
        assert reply.status == "succeeded", reply.error
        return reply


@pytest.fixture(scope="module")
def outage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outage]:
    workdir = tmp_path_factory.mktemp("provider-outage")
    with FakeHTTPServer() as server:
        server.default = error_reply(500, "The server had an error while processing your request.", "server_error")
        providers = {
            "primary": {
                "type": "openai",
                "model": "gpt-4.1-mini",
                "api_base_url": f"{server.url}/v1",
                "timeout_s": 10,
                "max_retries": 0,
                "cooldown_failures": COOLDOWN_FAILURES,
                "cooldown_window_s": 60,
                "cooldown_s": COOLDOWN_S,
            },
            "backup": {"type": "scripted", "text": BACKUP_TEXT, "chunk_size": 8},
        }
        config = write_config(workdir / "cascade.toml", providers, {"default": ["primary", "backup"]})
        redis_server = RedisServer(workdir / "redis", password=REDIS_PASSWORD).start()
        worker = FaultWorker("outage", redis_server.url, config, workdir / "worker.log")
        rdb = redis.Redis.from_url(redis_server.url)
        client = CascadeClient(redis_server.url)
        try:
            worker.start()
            yield Outage(server, client, rdb, worker)
        finally:
            worker.stop()
            client.close()
            rdb.close()
            redis_server.stop()


def attempts(reply: ChatReply) -> list[tuple[str, str, str | None]]:
    return [(a.provider, a.outcome, a.error_type) for a in reply.meta.attempts]


def test_outage_falls_to_the_backup_trips_the_cooldown_and_recovers(outage: Outage) -> None:
    cooldown = cooldown_key("primary")

    # The primary fails: every request is answered by the backup, until the cooldown trips.
    for _ in range(COOLDOWN_FAILURES):
        assert not outage.rdb.exists(cooldown)
        reply = outage.ask()
        assert attempts(reply) == [("primary", "failed", "server_error"), ("backup", "succeeded", None)]
        assert reply.meta.provider == "backup" and reply.replies[0].content == BACKUP_TEXT
    calls = len(outage.server.received)
    assert calls == COOLDOWN_FAILURES, "max_retries = 0: one call per request, no SDK retry"
    assert outage.rdb.exists(cooldown), "the cooldown tripped after the third failure"
    assert 0 < outage.rdb.pttl(cooldown) <= COOLDOWN_S * 1000

    # Cooling down: the primary is skipped without a call.
    reply = outage.ask()
    assert attempts(reply) == [("primary", "skipped", "provider_unavailable"), ("backup", "succeeded", None)]
    assert reply.meta.provider == "backup"
    assert len(outage.server.received) == calls, "a provider in cooldown is not called"

    # The server recovers; once the cooldown expired, traffic returns to the primary.
    outage.server.default = Reply(events=chat_stream(*PRIMARY_PIECES))
    wait_until(lambda: not outage.rdb.exists(cooldown), timeout_s=COOLDOWN_S + 10, what="the cooldown expires")
    for _ in range(2):
        reply = outage.ask()
        assert attempts(reply) == [("primary", "succeeded", None)]
        assert reply.meta.provider == "primary" and reply.replies[0].content == "".join(PRIMARY_PIECES)
    assert len(outage.server.received) == calls + 2

    # The worker sent its key to the provider (so the key was really in play for the scan below).
    authorization = {k.lower(): v for k, v in outage.server.received[-1].headers.items()}["authorization"]
    assert authorization == f"Bearer {PROVIDER_SECRETS['OPENAI_API_KEY']}"


def test_no_secret_in_anything_the_outage_produced(outage: Outage) -> None:
    assert_no_secrets(outage.rdb, [outage.worker.log_path])
