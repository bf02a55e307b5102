"""Hostile input through a real worker (extends tests/integration/test_bad_input.py): a task
message whose body is JSON nested 100k deep, a body that is not UTF-8, a ``request`` that is
JSON text nested 100k deep, a request nested deeper than the reply can be serialised, lone
surrogates in its metadata, and ``generation_kwargs`` that would redirect the provider call.

Each lands in ``cascade:dead`` once with a clear reason, gets a failed reply (once) wherever
there is an id to report to, is never retried, and the worker — the same process — goes on
serving the next request.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Connection

from tasks.contract.schemas import TASK_NAME
from tasks.producer.client import CascadeClient
from tests.support.redis_server import RedisServer

from .harness import (
    REQUEST_TIMEOUT_S,
    FaultWorker,
    ReplyWrites,
    assert_coherent,
    assert_no_secrets,
    dead_letters,
    new_id,
    running_worker,
    stored_events,
    stored_reply,
    wait_until,
)

pytestmark = pytest.mark.faults

TEXT = "Still serving."
# Long enough for a retry loop, were there one, to write a second dead letter or reply.
SETTLE_S = 0.5


@dataclass
class Target:
    url: str
    rdb: redis.Redis
    worker: FaultWorker
    producer: Celery
    client: CascadeClient
    writes: ReplyWrites


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory, server: RedisServer) -> Iterator[Target]:
    workdir = tmp_path_factory.mktemp("hostile-input")
    providers = {"steady": {"type": "scripted", "text": TEXT, "chunk_size": 4}}
    rdb = redis.Redis.from_url(server.url)
    producer = Celery("hostile-producer", broker=server.url, set_as_current=False)
    producer.conf.update(task_serializer="json", accept_content=["json"])
    client = CascadeClient(server.url)
    writes = ReplyWrites(rdb)
    try:
        with running_worker(workdir, server.url, providers, {"default": ["steady"]}, name="hostile") as worker:
            yield Target(server.url, rdb, worker, producer, client, writes)
    finally:
        writes.close()
        client.close()
        producer.close()
        rdb.close()


def publish_raw(url: str, body: bytes, task_id: str) -> None:
    """A task message for ``cascade.chat`` whose body is ``body``, bytes as they are."""
    headers = {"task": TASK_NAME, "id": task_id, "lang": "py"}
    with Connection(url) as connection:
        connection.Producer().publish(
            body, routing_key="chat", headers=headers, content_type="application/json", content_encoding="utf-8"
        )


def expect_dead_letter(target: Target, send: Callable[[], None], ident: str, reasons: set[str]) -> dict[str, Any]:
    """Send hostile input; it is dead-lettered once with one of ``reasons``, never retried, and
    the same worker process answers the next request."""
    pid, pool = target.worker.pid, target.worker.pool_pids()

    def letters() -> list[dict[str, Any]]:
        return [e for e in dead_letters(target.rdb) if ident in (e.get("request_id"), e.get("task_id"))]

    send()
    wait_until(letters, timeout_s=REQUEST_TIMEOUT_S, what=f"dead letter of {ident}")
    time.sleep(SETTLE_S)
    [letter] = letters()
    assert letter["reason"] in reasons, letter
    assert letter["message"]

    after = target.client.submit(prompt="next", chain="default")
    reply = target.client.wait(after, timeout_s=REQUEST_TIMEOUT_S)
    assert reply.status == "succeeded" and reply.replies[0].content == TEXT
    assert_coherent(stored_events(target.rdb, after), reply, after)
    assert len(letters()) == 1, "never retried"
    assert (target.worker.pid, target.worker.pool_pids()) == (pid, pool), "the worker kept serving, unrestarted"
    return letter


def expect_failed_reply(target: Target, request_id: str, reason: str) -> str:
    """One failed reply with ``reason``, written once, and exactly one ``error`` event."""
    reply = stored_reply(target.rdb, request_id)
    assert reply is not None and reply.status == "failed", reply
    assert reply.error is not None and reply.error.type == reason and reply.error.message
    events = stored_events(target.rdb, request_id)
    assert [e.type for e in events] == ["error"]
    assert events[0].reply == reply
    assert target.writes.sets_of(request_id) == ["set"]
    return reply.error.message


def test_task_body_nested_100k_deep(target: Target) -> None:
    task_id = new_id("deep-body")
    letter = expect_dead_letter(
        target, lambda: publish_raw(target.url, b"[" * 100_000, task_id), task_id, {"undecodable", "invalid_task"}
    )
    assert letter["task_id"] == task_id
    assert stored_reply(target.rdb, task_id) is None, "no id came with it: nothing to answer"


def test_task_body_that_is_not_utf8(target: Target) -> None:
    task_id = new_id("not-utf8")
    body = b'[[], {"request": {"prompt": "PROMPT-IN-BAD-BODY caf\xe9 \xff\xfe"}}, {}]'
    letter = expect_dead_letter(
        target, lambda: publish_raw(target.url, body, task_id), task_id, {"undecodable", "invalid_task"}
    )
    assert letter["task_id"] == task_id
    # The body (a prompt, perhaps) is kept in the dead letter, not written to the log.
    assert "PROMPT-IN-BAD-BODY" not in target.worker.log_text()


def test_request_that_is_json_text_nested_100k_deep(target: Target) -> None:
    task_id = new_id("deep-text")

    def send() -> None:
        target.producer.send_task(TASK_NAME, kwargs={"request": "[" * 100_000}, task_id=task_id, queue="chat")

    expect_dead_letter(target, send, task_id, {"invalid_request"})
    assert "JSON" in expect_failed_reply(target, task_id, "invalid_request")


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"metadata": {"a": json.loads("[" * 300 + "]" * 300)}}, id="metadata-300-deep"),
        pytest.param({"generation_kwargs": {"x": json.loads("[" * 300 + "]" * 300)}}, id="kwargs-300-deep"),
        pytest.param({"metadata": {"a": "\ud800"}}, id="lone-surrogate"),
    ],
)
def test_request_that_cannot_be_written_back_as_json(target: Target, fields: dict[str, Any]) -> None:
    request_id = new_id("unwritable")
    request = {"request_id": request_id, "prompt": "hi", **fields}

    def send() -> None:
        target.producer.send_task(TASK_NAME, kwargs={"request": request}, task_id=new_id("task"), queue="chat")

    expect_dead_letter(target, send, request_id, {"invalid_request"})
    assert "JSON" in expect_failed_reply(target, request_id, "invalid_request")


@pytest.mark.parametrize("key", ["api_key", "base_url", "extra_body"])
def test_generation_kwargs_that_would_redirect_the_call(target: Target, key: str) -> None:
    request_id = new_id("redirect")
    hostile = "sk-hostile-DoNotEcho-42" if key == "api_key" else {"url": "https://attacker.invalid/v1"}
    request = {"request_id": request_id, "prompt": "hi", "generation_kwargs": {key: hostile}}

    def send() -> None:
        target.producer.send_task(TASK_NAME, kwargs={"request": request}, task_id=new_id("task"), queue="chat")

    expect_dead_letter(target, send, request_id, {"invalid_request"})
    assert key in expect_failed_reply(target, request_id, "invalid_request")
    answered = json.dumps([e.model_dump(mode="json") for e in stored_events(target.rdb, request_id)])
    assert "DoNotEcho" not in answered and "attacker.invalid" not in answered


def test_no_secret_in_anything_the_hostile_input_produced(target: Target) -> None:
    assert_no_secrets(target.rdb, [target.worker.log_path])
    target.worker.assert_alive()
    assert target.worker.starts == 1
