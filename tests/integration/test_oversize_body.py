"""A message whose body exceeds CASCADE_MAX_MESSAGE_BYTES is refused before its body is
decoded, and answered: a ``failed`` reply (``request_too_large``) at the request id in its
``cascade_request_id`` header (else at its task id), its pending record ended so no reaper
resends it, one dead letter with a bounded preview, and the worker goes on serving.

Issue 11 item 6: such a request (3 messages of 800,000 characters, which the request schema
accepts) got no reply at all, and the pending sweep resent it five times."""

from __future__ import annotations

import pytest
import redis
from celery import Celery

from tasks.contract import keys
from tasks.contract.schemas import REQUEST_ID_HEADER, TASK_NAME
from tasks.producer.client import CascadeClient
from worker.state import pending

from .harness import dead_letters_for, follow, new_id, run_request, stored_reply, wait_until
from .scenarios import STEADY_TEXT

pytestmark = pytest.mark.integration

DEFAULT_MAX_MESSAGE_BYTES = 2_000_000


def test_an_oversize_request_is_answered_at_its_header_id(
    client: CascadeClient, rdb: redis.Redis, producer: Celery
) -> None:
    request_id = new_id()
    messages = [{"role": "user", "content": "x" * 800_000} for _ in range(3)]
    kwargs = {"request": {"request_id": request_id, "messages": messages}}
    # Recorded as the Python client records what it sends, so a reaper would resend it.
    pending.note_sent(rdb, request_id, "chat", kwargs)
    producer.send_task(
        TASK_NAME, kwargs=kwargs, queue="chat", task_id=request_id, headers={REQUEST_ID_HEADER: request_id}
    )

    outcome = follow(client, request_id, expect_start=False)
    assert outcome.types() == ["error"]
    assert outcome.reply.status == "failed"
    assert outcome.reply.error is not None and outcome.reply.error.type == "request_too_large"
    assert "exceeds" in outcome.reply.error.message
    assert rdb.zscore(pending.PENDING_SET, request_id) is None, "the pending record is ended"
    assert rdb.exists(pending.record_key(request_id)) == 0
    [letter] = dead_letters_for(rdb, request_id)
    assert letter["reason"] == "request_too_large"
    assert len(letter["body"]) <= 2_000  # only a preview is kept
    assert run_request(client, prompt="still there?").reply.replies[0].content == STEADY_TEXT
    assert len(dead_letters_for(rdb, request_id)) == 1, "never resent"


def test_an_oversize_body_without_the_header_is_answered_at_its_task_id(
    client: CascadeClient, rdb: redis.Redis, producer: Celery
) -> None:
    task_id, request_id = new_id(), new_id()
    huge = {"request_id": request_id, "prompt": "x" * (DEFAULT_MAX_MESSAGE_BYTES + 10)}
    producer.send_task(TASK_NAME, kwargs={"request": huge}, queue="chat", task_id=task_id)

    [letter] = wait_until(lambda: dead_letters_for(rdb, task_id), timeout_s=15, what="dead letter")
    assert letter["reason"] == "request_too_large"
    assert "exceeds" in letter["message"]
    assert len(letter["body"]) <= 2_000
    reply = follow(client, task_id, expect_start=False).reply
    assert reply.error is not None and reply.error.type == "request_too_large"
    assert stored_reply(rdb, request_id) is None  # its body was never read
    assert rdb.exists(keys.events_stream(request_id)) == 0
    outcome = run_request(client, prompt="still there?")
    assert outcome.reply.status == "succeeded"
    assert outcome.reply.replies[0].content == STEADY_TEXT
