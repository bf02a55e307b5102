"""Reading request ids out of queued and unacked messages (worker.state.pending) never trips on a
hostile entry: the reaper's pass must not fail because a producer queued junk. A lost request is
resent as the task its record names."""

from __future__ import annotations

import json
from typing import Any

import fakeredis

from tasks.contract.schemas import REQUEST_ID_HEADER
from worker.state.pending import _ids_in, note_sent, request_id_in, resend_lost, task_kwargs


def test_entries_with_headers_of_the_wrong_type_are_skipped() -> None:
    good = {"headers": {REQUEST_ID_HEADER: "r-1"}, "body": ""}
    hostile = [
        json.dumps({"headers": ["cascade.chat"], "body": ""}),
        json.dumps({"headers": "text", "body": ""}),
        json.dumps([1, 2, 3]),
        "not json {",
        json.dumps(good),
    ]
    assert _ids_in(hostile, unacked=False) == {"r-1"}
    assert _ids_in([json.dumps([entry, "", "chat"]) for entry in ({"headers": [1]}, good)], unacked=True) == {"r-1"}


def test_a_lost_image_request_is_resent_as_cascade_image(fake_redis: fakeredis.FakeRedis) -> None:
    kwargs = {"request": {"request_id": "img-9", "prompt": "a lighthouse", "chain": "images"}}
    note_sent(fake_redis, "img-9", "chat", kwargs, task="cascade.image")
    note_sent(fake_redis, "chat-9", "chat", {"request": {"request_id": "chat-9", "prompt": "hi"}})
    sent: list[tuple[str, str, str]] = []

    def resend(queue: str, message: dict[str, Any], task: str) -> None:
        sent.append((message["request"]["request_id"], queue, task))

    suspects: dict[str, float] = {}
    assert resend_lost(fake_redis, resend, older_than_s=0, suspects=suspects) == []  # once could be an instant
    assert sorted(resend_lost(fake_redis, resend, older_than_s=0, suspects=suspects)) == ["chat-9", "img-9"]
    assert sorted(sent) == [("chat-9", "chat", "cascade.chat"), ("img-9", "chat", "cascade.image")]


def test_a_record_naming_another_task_is_never_resent(fake_redis: fakeredis.FakeRedis) -> None:
    note_sent(fake_redis, "odd-1", "chat", {"request": {"request_id": "odd-1"}}, task="celery.backend_cleanup")
    sent: list[str] = []
    suspects: dict[str, float] = {}
    for _ in range(2):
        resend_lost(fake_redis, lambda _q, _k, task: sent.append(task), older_than_s=0, suspects=suspects)
    assert sent == []


def test_image_messages_are_read_as_cascade_messages() -> None:
    body = json.dumps([[], {"request": {"request_id": "img-3", "prompt": "p"}}, {}])
    for task, found in (("cascade.image", "img-3"), ("cascade.chat", "img-3"), ("other.task", None)):
        message = {"headers": {"task": task}, "body": body, "properties": {}}
        assert request_id_in(task_kwargs(message)) == found
