"""A message whose body exceeds CASCADE_MAX_MESSAGE_BYTES is refused before its body is
decoded: one dead letter by task id, no run, and the worker goes on serving."""

from __future__ import annotations

import pytest
import redis
from celery import Celery

from tasks.client import CascadeClient
from tasks.schemas import TASK_NAME

from .harness import dead_letters_for, new_id, run_request, stored_reply, wait_until
from .scenarios import STEADY_TEXT

pytestmark = pytest.mark.integration

DEFAULT_MAX_MESSAGE_BYTES = 2_000_000


def test_an_oversize_body_is_dead_lettered_unread(client: CascadeClient, rdb: redis.Redis, redis_url: str) -> None:
    producer = Celery("oversize-producer", broker=redis_url, set_as_current=False)
    producer.conf.update(task_serializer="json", accept_content=["json"])
    task_id, request_id = new_id(), new_id()
    huge = {"request_id": request_id, "prompt": "x" * (DEFAULT_MAX_MESSAGE_BYTES + 10)}
    try:
        producer.send_task(TASK_NAME, kwargs={"request": huge}, queue="chat", task_id=task_id)
    finally:
        producer.close()
    [letter] = wait_until(lambda: dead_letters_for(rdb, task_id), timeout_s=15, what="dead letter")
    assert letter["reason"] == "request_too_large"
    assert "exceeds" in letter["message"]
    assert len(letter["body"]) <= 2_000  # only a preview is kept
    assert stored_reply(rdb, request_id) is None  # its body was never read, so nothing ran
    outcome = run_request(client, prompt="still there?")
    assert outcome.reply.status == "succeeded"
    assert outcome.reply.replies[0].content == STEADY_TEXT
