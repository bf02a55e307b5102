"""The README's Redis ACL layout, applied as written (its ``ACL SETUSER`` lines are read from
README.md): a worker logged in as ``cascade-worker`` serves a request the Python client sends
as ``cascade-producer``; the producer can follow, read and cancel, but cannot take messages off
a queue, read one, touch ``unacked``, write replies, events or dead letters, or publish Celery
remote-control commands. A junk entry the producer can still push is dead-lettered."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from tasks.producer.client import CascadeClient
from tests.support.redis_server import RedisServer

from .harness import REPO, REQUEST_TIMEOUT_S, FaultWorker, dead_letters, running_worker, wait_until

pytestmark = pytest.mark.faults

PASSWORDS = {"WORKER_PASSWORD": "acl-worker-pw-51", "PRODUCER_PASSWORD": "acl-producer-pw-77"}


def readme_acl_lines() -> list[list[str]]:
    """The README's ``ACL SETUSER`` lines, split into words, with this test's passwords."""

    def word_of(word: str) -> str:
        return ">" + PASSWORDS[word[1:]] if word[1:] in PASSWORDS and word.startswith(">") else word

    text = (REPO / "README.md").read_text()
    lines = [[word_of(w) for w in shlex.split(line)] for line in re.findall(r"^ACL SETUSER .*$", text, re.MULTILINE)]
    assert {line[2] for line in lines} >= {"cascade-worker", "cascade-producer", "default"}
    return lines


@dataclass
class Acl:
    admin: redis.Redis
    producer_url: str
    worker: FaultWorker


@pytest.fixture(scope="module")
def acl(tmp_path_factory: pytest.TempPathFactory, server: RedisServer) -> Iterator[Acl]:
    workdir = tmp_path_factory.mktemp("acl")
    admin = redis.Redis.from_url(server.url)
    admin.flushall()
    # The default user (the suite's password) stays on until the layout is in place; it goes last.
    for line in readme_acl_lines():
        if line[2] != "default":
            admin.execute_command(*line)
    host = f"127.0.0.1:{server.port}"
    worker_url = f"redis://cascade-worker:{PASSWORDS['WORKER_PASSWORD']}@{host}/0"
    producer_url = f"redis://cascade-producer:{PASSWORDS['PRODUCER_PASSWORD']}@{host}/0"
    providers = {"steady": {"type": "scripted", "text": "ok"}}
    try:
        with running_worker(workdir, worker_url, providers, {"default": ["steady"]}, name="acl") as worker:
            yield Acl(admin, producer_url, worker)
    finally:
        admin.execute_command("ACL", "SETUSER", "default", "on")
        admin.close()


def test_the_producer_sends_follows_and_cancels_as_its_own_user(acl: Acl) -> None:
    with CascadeClient(acl.producer_url) as client:
        request_id = client.submit(prompt="hello")
        reply = client.wait(request_id, timeout_s=REQUEST_TIMEOUT_S)
        assert reply.status == "succeeded"
        assert [e.type for e in client.events(request_id, timeout_s=REQUEST_TIMEOUT_S)][-1] == "done"
        client.cancel(request_id)
    assert "NOPERM" not in acl.worker.log_text() and "no permissions" not in acl.worker.log_text()


@pytest.mark.parametrize(
    "command",
    [
        ("BRPOP", "chat", 1),
        ("LRANGE", "chat", 0, -1),
        ("LREM", "chat", 0, "x"),
        ("HGETALL", "unacked"),
        ("LPUSH", "cascade:dead", "x"),
        ("SET", "cascade:reply:someone", "{}"),
        ("XADD", "cascade:events:someone", "*", "event", "{}"),
        ("PUBLISH", "/0.celery.pidbox", "shutdown"),
        ("SET", "cascade:lease:someone", "me"),
        ("FLUSHALL",),
    ],
    ids=lambda command: " ".join(str(part) for part in command[:2]),
)
def test_what_the_producer_cannot_do(acl: Acl, command: tuple[Any, ...]) -> None:
    producer = redis.Redis.from_url(acl.producer_url)
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            producer.execute_command(*command)
    finally:
        producer.close()


def test_junk_the_producer_can_push_is_dead_lettered(acl: Acl) -> None:
    producer = redis.Redis.from_url(acl.producer_url)
    try:
        producer.lpush("chat", "junk-from-a-producer {")
    finally:
        producer.close()
    wait_until(
        lambda: any("junk-from-a-producer" in (e.get("body") or "") for e in dead_letters(acl.admin)),
        timeout_s=REQUEST_TIMEOUT_S,
        what="dead letter",
    )
    acl.worker.assert_alive()
