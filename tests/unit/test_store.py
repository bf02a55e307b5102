"""The reply store and the dead-letter list (worker/state/store.py) on fakeredis."""

from __future__ import annotations

import json
from typing import Any

import fakeredis
import pytest

from tasks.contract import keys
from tasks.contract.schemas import ChatReply, ErrorInfo
from worker.state.store import DEAD_BODY_PREVIEW_CHARS, DEAD_ID_CHARS, DEAD_MESSAGE_CHARS, DeadLetters, ReplyStore


def dead(client: fakeredis.FakeRedis) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in client.lrange(keys.DEAD_LETTERS, 0, -1)]


def test_reply_store_round_trip(fake_redis: fakeredis.FakeRedis) -> None:
    store = ReplyStore(fake_redis, ttl_s=300)
    assert store.get("r1") is None
    reply = ChatReply(request_id="r1", status="failed", error=ErrorInfo(type="invalid_request", message="m"))
    assert store.ttl_s == 300  # the publisher writes replies with this TTL
    fake_redis.set(keys.reply_key("r1"), reply.model_dump_json(), ex=store.ttl_s)
    assert store.get("r1") == reply


def test_dead_letter_entry(fake_redis: fakeredis.FakeRedis) -> None:
    letters = DeadLetters(fake_redis, maxlen=10, ttl_s=1_000)
    letters.push("invalid_request", "request_id must match", body={"x": 1}, request_id="r", task_id="t", queue="chat")
    [entry] = dead(fake_redis)
    assert entry["reason"] == "invalid_request"
    assert entry["message"] == "request_id must match"
    assert (entry["request_id"], entry["task_id"], entry["queue"]) == ("r", "t", "chat")
    assert json.loads(entry["body"]) == {"x": 1}
    assert entry["at"] > 0
    assert 0 < fake_redis.ttl(keys.DEAD_LETTERS) <= 1_000


def test_dead_letters_newest_first_and_bounded(fake_redis: fakeredis.FakeRedis) -> None:
    letters = DeadLetters(fake_redis, maxlen=5, ttl_s=60)
    for n in range(12):
        letters.push("undecodable", f"message {n}")
    entries = dead(fake_redis)
    assert [e["message"] for e in entries] == [f"message {n}" for n in range(11, 6, -1)]


def test_dead_letter_without_body(fake_redis: fakeredis.FakeRedis) -> None:
    DeadLetters(fake_redis, maxlen=5, ttl_s=60).push("unknown_task", "unknown task 'x'")
    assert dead(fake_redis)[0]["body"] is None


@pytest.mark.parametrize(
    "body",
    ["x" * (DEAD_BODY_PREVIEW_CHARS * 3), b"y" * (DEAD_BODY_PREVIEW_CHARS * 10), {"k": "z" * DEAD_BODY_PREVIEW_CHARS}],
)
def test_dead_letter_body_preview_is_truncated(fake_redis: fakeredis.FakeRedis, body: Any) -> None:
    DeadLetters(fake_redis, maxlen=5, ttl_s=60).push("invalid_request", "too big", body=body)
    preview = dead(fake_redis)[0]["body"]
    assert isinstance(preview, str)
    assert len(preview) == DEAD_BODY_PREVIEW_CHARS


def test_dead_letter_body_of_undecodable_bytes(fake_redis: fakeredis.FakeRedis) -> None:
    DeadLetters(fake_redis, maxlen=5, ttl_s=60).push("undecodable", "pickle", body=b"\x80\x04\x95garbage")
    preview = dead(fake_redis)[0]["body"]
    assert "garbage" in preview and "\ufffd" in preview


def test_dead_letter_body_of_an_unserialisable_object(fake_redis: fakeredis.FakeRedis) -> None:
    class Odd:
        def __repr__(self) -> str:
            return "<odd>"

    DeadLetters(fake_redis, maxlen=5, ttl_s=60).push("invalid_task", "odd", body={"arg": Odd()})
    assert "<odd>" in dead(fake_redis)[0]["body"]


def test_dead_letter_fields_taken_from_the_message_are_bounded(fake_redis: fakeredis.FakeRedis) -> None:
    """Issue 11 item 14: the task and id headers were stored whole, whatever their length."""
    huge = "t" * 1_000_000
    DeadLetters(fake_redis, maxlen=5, ttl_s=60).push(
        "invalid_task", "m" * 100_000, task_id=huge, request_id=huge, queue=huge, body=huge
    )
    [raw] = fake_redis.lrange(keys.DEAD_LETTERS, 0, -1)
    entry = json.loads(raw)
    assert len(entry["task_id"]) == len(entry["request_id"]) == len(entry["queue"]) == DEAD_ID_CHARS
    assert len(entry["message"]) == DEAD_MESSAGE_CHARS
    assert len(raw) < 10_000
