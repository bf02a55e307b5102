"""Idempotency by ``request_id``: a redelivered request whose reply is stored is not run again.

A copy of a running request (its lease held by a worker) is not run, and an invalid copy of it
is only dead-lettered: it must not answer for the request that runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from tasks.contract import keys
from tasks.contract.schemas import TASK_NAME
from tasks.producer.client import CascadeClient

from .harness import KeyWrites, dead_letters_for, follow, new_id, run_request, stored_events, wait_until

pytestmark = pytest.mark.integration

TASK_RESULT_TIMEOUT_S = 15.0


@pytest.fixture(scope="module")
def producer(redis_url: str) -> Iterator[Celery]:
    """A Celery producer with the worker's result backend, to wait for a resent task to finish."""
    app = Celery("idempotency-producer", broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], result_accept_content=["json"])
    try:
        yield app
    finally:
        app.close()


def resend_and_wait(rdb: redis.Redis, task_id: str, send: Callable[[], None]) -> None:
    """Send a copy of a task and block until the worker finished it: Celery stores the task's
    result (SET celery-task-meta-<task id>) once the task returned, already-run or not. Celery
    never overwrites a SUCCESS result, so a result left by an earlier run is removed first."""
    result_key = f"celery-task-meta-{task_id}"
    rdb.delete(result_key)
    writes = KeyWrites(rdb, result_key)
    try:
        send()
        wait_until(lambda: "set" in writes.drain(0.1), timeout_s=TASK_RESULT_TIMEOUT_S, what="resent task finished")
    finally:
        writes.close()


def snapshot(rdb: redis.Redis, request_id: str) -> tuple[int, bytes | None, list[Any]]:
    return (
        rdb.xlen(keys.events_stream(request_id)),
        rdb.get(keys.reply_key(request_id)),
        stored_events(rdb, request_id),
    )


def test_resent_request_with_the_same_task_id_is_not_run_again(client: CascadeClient, rdb: redis.Redis) -> None:
    first = run_request(client, prompt="hello", chain="default")
    before = snapshot(rdb, first.request_id)
    reply_writes = KeyWrites(rdb, keys.reply_key(first.request_id))
    try:
        # CascadeClient.submit uses the request id as the Celery task id: the very same message.
        resend_and_wait(
            rdb,
            first.request_id,
            lambda: client.submit(request_id=first.request_id, prompt="hello", chain="default"),
        )
        assert reply_writes.drain() == [], "the stored reply was written again"
    finally:
        reply_writes.close()

    assert snapshot(rdb, first.request_id) == before
    assert follow(client, first.request_id).reply == first.reply


def test_resent_request_with_a_new_task_id_is_not_run_again(
    client: CascadeClient, rdb: redis.Redis, producer: Celery
) -> None:
    first = run_request(client, prompt="hello", chain="transient_rate_limit")
    before = snapshot(rdb, first.request_id)
    task_id = new_id()
    request = {"request_id": first.request_id, "prompt": "hello", "chain": "transient_rate_limit"}

    resend_and_wait(
        rdb,
        task_id,
        lambda: producer.send_task(TASK_NAME, kwargs={"request": request}, task_id=task_id, queue="chat"),
    )

    assert snapshot(rdb, first.request_id) == before
    # The task's return value is the stored reply, unchanged.
    result = producer.AsyncResult(task_id).get(timeout=TASK_RESULT_TIMEOUT_S)
    assert result == first.reply.model_dump(mode="json")
    assert rdb.get(keys.reply_key(task_id)) is None


def test_resent_failed_and_cancelled_requests_keep_their_reply(client: CascadeClient, rdb: redis.Redis) -> None:
    failed = run_request(client, prompt="hello", chain="all_fail")
    assert failed.reply.status == "failed"

    cancelled_id = new_id()
    client.cancel(cancelled_id)
    client.submit(request_id=cancelled_id, prompt="hello", chain="default")
    cancelled = follow(client, cancelled_id)
    assert cancelled.reply.status == "cancelled"
    rdb.delete(keys.cancel_key(cancelled_id))  # a rerun would now succeed, if there were one

    for outcome in (failed, cancelled):
        before = snapshot(rdb, outcome.request_id)
        chain = "all_fail" if outcome is failed else "default"
        resend_and_wait(
            rdb,
            outcome.request_id,
            lambda rid=outcome.request_id, chain=chain: client.submit(request_id=rid, prompt="hello", chain=chain),
        )
        assert snapshot(rdb, outcome.request_id) == before


def test_resent_rejected_request_keeps_its_reply(client: CascadeClient, rdb: redis.Redis, producer: Celery) -> None:
    request_id = new_id()
    request = {"request_id": request_id, "messages": []}
    producer.send_task(TASK_NAME, kwargs={"request": request}, task_id=new_id(), queue="chat")
    first = follow(client, request_id, expect_start=False)
    assert first.reply.error is not None
    assert first.reply.error.type == "invalid_request"
    before = snapshot(rdb, request_id)

    task_id = new_id()
    resend_and_wait(
        rdb,
        task_id,
        lambda: producer.send_task(TASK_NAME, kwargs={"request": request}, task_id=task_id, queue="chat"),
    )

    assert snapshot(rdb, request_id) == before


def test_an_invalid_copy_of_a_running_request_is_only_dead_lettered(rdb: redis.Redis, producer: Celery) -> None:
    request_id = new_id()
    rdb.set(keys.lease_key(request_id), "another-worker:token", px=60_000)  # the request runs elsewhere
    try:
        task_id = new_id()
        request = {"request_id": request_id, "prompt": "hello", "chain": "no-such-chain"}
        resend_and_wait(
            rdb,
            task_id,
            lambda: producer.send_task(TASK_NAME, kwargs={"request": request}, task_id=task_id, queue="chat"),
        )
        result = producer.AsyncResult(task_id).get(timeout=TASK_RESULT_TIMEOUT_S)
        assert result["status"] == "duplicate"
        assert rdb.get(keys.reply_key(request_id)) is None
        assert rdb.xlen(keys.events_stream(request_id)) == 0
        assert [letter["reason"] for letter in dead_letters_for(rdb, task_id)] == ["unknown_chain"]
    finally:
        rdb.delete(keys.lease_key(request_id))
