"""Bad input: each gives a clear error and exactly one ``cascade:dead`` entry with its reason,
a failed reply (once) wherever there is an id to report to, never a retry loop, and the worker
goes on serving the next request."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Connection

from tasks.contract import keys
from tasks.contract.schemas import REQUEST_ID_HEADER, TASK_NAME
from tasks.producer.client import CascadeClient

from .harness import (
    KeyWrites,
    Outcome,
    dead_letters,
    dead_letters_for,
    follow,
    new_id,
    run_request,
    stored_reply,
    wait_until,
)
from .scenarios import MAX_INPUT_CHARS, MAX_MESSAGES, STEADY_TEXT

pytestmark = pytest.mark.integration

DEAD_LETTER_TIMEOUT_S = 15.0


def publish_raw(redis_url: str, body: Any, **options: Any) -> None:
    """Put a raw message on the ``chat`` queue, bypassing Celery's producer."""
    with Connection(redis_url) as connection:
        connection.Producer().publish(body, routing_key="chat", **options)


def task_headers(task_id: str | None, **extra: Any) -> dict[str, Any]:
    headers: dict[str, Any] = {"task": TASK_NAME, "lang": "py", **extra}
    if task_id is not None:
        headers["id"] = task_id
    return headers


@dataclass
class Rejection:
    letter: dict[str, Any]
    outcome: Outcome | None


def expect_rejection(
    client: CascadeClient,
    rdb: redis.Redis,
    send: Callable[[], None],
    *,
    reason: str,
    ident: str | None = None,
    marker: str | None = None,
    reply_id: str | None = None,
    no_reply_under: str | None = None,
    reply_type: str | None = None,
) -> Rejection:
    """Send bad input and check what it left behind.

    ``ident`` (request or task id) or ``marker`` (text inside the body) finds its dead letter;
    ``reply_id`` is where a failed reply must be stored (once); ``no_reply_under`` is an id under
    which nothing may be stored; ``reply_type`` is the reply's error type when it is not the
    dead letter's ``reason``.
    """
    assert ident or marker

    def find() -> list[dict[str, Any]]:
        if ident is not None:
            return dead_letters_for(rdb, ident)
        return [e for e in dead_letters(rdb) if marker and marker in (e.get("body") or "")]

    watched = reply_id or no_reply_under
    writes = KeyWrites(rdb, keys.reply_key(watched)) if watched else None
    try:
        send()
        wait_until(find, timeout_s=DEAD_LETTER_TIMEOUT_S, what=f"dead letter ({reason})")
        outcome = None
        if reply_id is not None:
            outcome = follow(client, reply_id, expect_start=False)
            assert outcome.types() == ["error"], "a rejected request has exactly one event: error"
            reply = outcome.reply
            assert reply.status == "failed"
            assert reply.error is not None
            assert reply.error.type == (reply_type or reason)
            assert reply.error.message
            assert outcome.events[-1].error == reply.error
            assert reply.replies == []
            assert reply.meta.attempts == []

        # The worker goes on serving the next request.
        after = run_request(client, prompt="next", chain="default")
        assert after.reply.status == "succeeded"
        assert after.reply.replies[0].content == STEADY_TEXT

        # Exactly one dead letter, and no retry loop writing more of them or more replies.
        letters = find()
        assert len(letters) == 1, letters
        letter = letters[0]
        assert letter["reason"] == reason
        assert letter["message"]
        assert letter["at"]
        if writes is not None:
            assert writes.drain() == (["set"] if reply_id else [])
        if no_reply_under is not None:
            assert stored_reply(rdb, no_reply_under) is None
            assert rdb.xlen(keys.events_stream(no_reply_under)) == 0
    finally:
        if writes is not None:
            writes.close()
    return Rejection(letter, outcome)


# --- messages that are not valid task messages (the consumer's dead letters) --------------------


def test_message_that_is_not_json(client: CascadeClient, rdb: redis.Redis, redis_url: str) -> None:
    task_id = new_id()

    def send() -> None:
        publish_raw(
            redis_url,
            b"not json {",
            content_type="application/json",
            content_encoding="utf-8",
            headers=task_headers(task_id),
        )

    rejection = expect_rejection(client, rdb, send, reason="undecodable", ident=task_id, no_reply_under=task_id)
    assert rejection.letter["task_id"] == task_id
    assert "application/json" in rejection.letter["message"]
    assert rejection.letter["body"] == "not json {"


def test_pickle_message_is_refused_before_decoding(client: CascadeClient, rdb: redis.Redis, redis_url: str) -> None:
    task_id = new_id()
    body = [[], {"request": {"prompt": "hello", "chain": "default"}}, {}]

    def send() -> None:
        publish_raw(redis_url, body, serializer="pickle", headers=task_headers(task_id))

    rejection = expect_rejection(client, rdb, send, reason="content_disallowed", ident=task_id, no_reply_under=task_id)
    assert rejection.letter["task_id"] == task_id
    assert "pickle" in rejection.letter["message"]


@pytest.mark.parametrize(
    ("body", "extra_headers"),
    [
        pytest.param({"not": "a task body"}, {}, id="object-body"),
        pytest.param("just a string", {}, id="string-body"),
        pytest.param([7, {"request": {"prompt": "x"}}, {}], {}, id="args-not-a-list"),
        pytest.param([[], ["request"], {}], {}, id="kwargs-not-an-object"),
        pytest.param([[], {"request": {"prompt": "x"}}, {"link": 1}], {}, id="unknown-embed-field"),
        pytest.param([[], {"request": {"prompt": "x"}}, {}], {"task": ["cascade.chat"]}, id="task-header-a-list"),
        pytest.param([[], {"request": {"prompt": "x"}}, {}], {"retries": "3"}, id="retries-header-a-string"),
        pytest.param([[], {"request": {"prompt": "x"}}, {}], {"is_eager": True}, id="reserved-header"),
        pytest.param([[], {"request": {"prompt": "x"}}, {}], {"x-big": "y" * 9_000}, id="huge-header"),
    ],
)
def test_malformed_task_message_is_rejected_without_crashing_the_worker(
    client: CascadeClient, rdb: redis.Redis, redis_url: str, body: Any, extra_headers: dict[str, Any]
) -> None:
    task_id = new_id()

    def send() -> None:
        publish_raw(redis_url, body, serializer="json", headers=task_headers(task_id, **extra_headers))

    rejection = expect_rejection(client, rdb, send, reason="invalid_task", ident=task_id, no_reply_under=task_id)
    assert rejection.letter["task_id"] == task_id


def test_task_message_without_an_id_is_rejected(client: CascadeClient, rdb: redis.Redis, redis_url: str) -> None:
    marker = f"marker-{new_id()}"

    def send() -> None:
        body = [[], {"request": {"prompt": marker, "chain": "default"}}, {}]
        publish_raw(redis_url, body, serializer="json", headers=task_headers(None))

    rejection = expect_rejection(client, rdb, send, reason="invalid_task", marker=marker)
    assert "id" in rejection.letter["message"]


def test_message_that_is_not_a_task_message(client: CascadeClient, rdb: redis.Redis, redis_url: str) -> None:
    marker = f"marker-{new_id()}"

    def send() -> None:
        publish_raw(redis_url, {"hello": marker}, serializer="json")

    expect_rejection(client, rdb, send, reason="unknown_message", marker=marker)


def test_unknown_task_name(client: CascadeClient, rdb: redis.Redis, producer: Celery) -> None:
    task_id = new_id()

    def send() -> None:
        producer.send_task("cascade.no_such_task", kwargs={"request": {"prompt": "x"}}, task_id=task_id, queue="chat")

    rejection = expect_rejection(client, rdb, send, reason="unknown_task", ident=task_id, no_reply_under=task_id)
    assert "cascade.no_such_task" in rejection.letter["message"]


def test_a_task_header_that_is_a_list_leaves_the_queue_usable(
    client: CascadeClient, rdb: redis.Redis, redis_url: str
) -> None:
    """Issue 11 item 2: such a message stopped the worker and went back on the queue, so every
    worker started afterwards stopped too."""
    task_id = new_id()

    def send() -> None:
        body = [[], {"request": {"prompt": "x"}}, {}]
        publish_raw(redis_url, body, serializer="json", headers=task_headers(task_id, task=["cascade.chat"]))

    rejection = expect_rejection(client, rdb, send, reason="invalid_task", ident=task_id, no_reply_under=task_id)
    assert "'task' header" in rejection.letter["message"]
    assert rdb.llen("chat") == 0, "the message is not back on the queue"


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("this is not a celery message { {marker}", id="raw-text"),
        pytest.param('[1, 2, 3, "{marker}"]', id="json-list"),
        pytest.param('{"hello": "{marker}"}', id="json-object-not-an-envelope"),
        pytest.param(
            '{"body": "!!{marker}!!", "content-encoding": "utf-8", "content-type": "application/json", '
            '"headers": {"task": "cascade.chat", "id": "{marker}"}, "properties": {"body_encoding": "base64", '
            '"delivery_tag": "t", "delivery_info": {"exchange": "", "routing_key": "chat"}}}',
            id="body-not-base64",
        ),
        pytest.param(b"\xff\xfe not utf-8 {marker}", id="not-utf8"),
    ],
)
def test_an_entry_that_is_no_message_at_all_is_dead_lettered_raw(
    client: CascadeClient, rdb: redis.Redis, raw: str | bytes
) -> None:
    """Issue 11 item 1: ``redis-cli LPUSH chat '...'`` stopped the worker inside kombu."""
    marker = f"marker-{new_id()}"
    entry = raw.replace(b"{marker}", marker.encode()) if isinstance(raw, bytes) else raw.replace("{marker}", marker)

    rejection = expect_rejection(client, rdb, lambda: rdb.lpush("chat", entry), reason="undecodable", marker=marker)
    assert marker in rejection.letter["body"]
    assert rejection.letter["queue"] == "chat"


def test_an_entry_over_the_preview_is_kept_bounded(client: CascadeClient, rdb: redis.Redis) -> None:
    marker = f"marker-{new_id()}"
    entry = marker + "x" * 50_000

    rejection = expect_rejection(client, rdb, lambda: rdb.lpush("chat", entry), reason="undecodable", marker=marker)
    assert len(rejection.letter["body"]) <= 2_000


def test_a_celery_builtin_task_is_dead_lettered(client: CascadeClient, rdb: redis.Redis, producer: Celery) -> None:
    """Issue 11 item 3: ``celery.chord_unlock`` (a task every Celery worker has) was run or dropped."""
    task_id = new_id()

    def send() -> None:
        producer.send_task("celery.chord_unlock", args=["group-id", {}], task_id=task_id, queue="chat")

    rejection = expect_rejection(client, rdb, send, reason="unknown_task", ident=task_id, no_reply_under=task_id)
    assert "celery.chord_unlock" in rejection.letter["message"]


@pytest.mark.parametrize(
    ("option", "options"),
    [
        pytest.param("expires", {"expires": -60}, id="expired"),
        pytest.param("expires", {"expires": 3600}, id="expires-later"),
        pytest.param("eta", {"countdown": 3600}, id="countdown"),
        pytest.param("timelimit", {"time_limit": 10_000, "soft_time_limit": 9_000}, id="time-limits"),
        pytest.param("compression", {"compression": "zlib"}, id="zlib"),
        pytest.param("compression", {"compression": "bzip2"}, id="bzip2"),
        pytest.param("callbacks", {"link": "signature"}, id="link"),
    ],
)
def test_celery_options_cascade_does_not_honour_are_refused(
    client: CascadeClient, rdb: redis.Redis, producer: Celery, option: str, options: dict[str, Any]
) -> None:
    """Issue 11 items 4 and 9: an expired message vanished (no reply, no dead letter); a
    compressed body was inflated before the size check; ``timelimit`` lifted the worker's limits;
    ``eta``/``countdown`` held a message in memory. Each is refused, answered at its
    ``cascade_request_id`` header, and dead-lettered with the option named."""
    request_id = new_id()
    if options.get("link") == "signature":
        options = {"link": producer.signature("cascade.chat", kwargs={"request": {"prompt": "again"}})}
    send = send_request(
        producer,
        new_id(),
        kwargs={"request": {"request_id": request_id, "prompt": "hi"}},
        headers={REQUEST_ID_HEADER: request_id},
        **options,
    )

    rejection = expect_rejection(
        client,
        rdb,
        send,
        reason="unsupported_option",
        ident=request_id,
        reply_id=request_id,
        reply_type="invalid_request",
    )
    assert option in rejection.letter["message"]


# --- task messages whose request is bad (the task's own dead letters) -----------------------------


def send_request(producer: Celery, task_id: str, **call: Any) -> Callable[[], None]:
    def send() -> None:
        producer.send_task(TASK_NAME, task_id=task_id, queue="chat", **call)

    return send


@pytest.mark.parametrize(
    ("fields", "mentions"),
    [
        pytest.param({"messages": []}, "messages", id="empty-messages"),
        pytest.param({"messages": [{"role": "robot", "content": "hi"}]}, "role", id="bad-role"),
        pytest.param({"messages": [{"role": "user"}]}, "content", id="message-without-content"),
        pytest.param({"chain": "default"}, "messages or prompt", id="no-messages-no-prompt"),
        pytest.param({"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, "either", id="both"),
        pytest.param({"prompt": "hi", "surprise": 1}, "surprise", id="unknown-field"),
        pytest.param({"prompt": "hi", "timeout_s": -1}, "timeout_s", id="negative-timeout"),
        pytest.param({"prompt": "hi", "stream": "maybe"}, "stream", id="bad-stream-flag"),
        pytest.param(
            {"prompt": "hi", "generation_kwargs": {"api_key": "sk-do-not-echo"}}, "api_key", id="routing-override"
        ),
    ],
)
def test_request_failing_validation(
    client: CascadeClient, rdb: redis.Redis, producer: Celery, fields: dict[str, Any], mentions: str
) -> None:
    request_id = new_id()
    task_id = new_id()
    send = send_request(producer, task_id, kwargs={"request": {"request_id": request_id, **fields}})

    rejection = expect_rejection(client, rdb, send, reason="invalid_request", ident=request_id, reply_id=request_id)
    assert rejection.outcome is not None
    error = rejection.outcome.reply.error
    assert error is not None
    assert mentions in error.message
    assert rejection.letter["request_id"] == request_id
    assert rejection.letter["task_id"] == task_id
    # Nothing is stored under the task id: the producer's request id wins.
    assert stored_reply(rdb, task_id) is None
    assert "sk-do-not-echo" not in rejection.outcome.reply.model_dump_json()


@pytest.mark.parametrize(
    "call",
    [
        pytest.param({"args": [{"prompt": "hi"}]}, id="positional"),
        pytest.param({"args": [1], "kwargs": {"request": {"prompt": "hi"}}}, id="positional-and-keyword"),
        pytest.param({"kwargs": {"req": {"prompt": "hi"}}}, id="wrong-keyword"),
        pytest.param({"kwargs": {"request": {"prompt": "hi"}, "extra": 1}}, id="extra-keyword"),
        pytest.param({}, id="no-arguments"),
        pytest.param({"kwargs": {"request": 42}}, id="request-not-an-object"),
        pytest.param({"kwargs": {"request": "{not json"}}, id="request-broken-json-string"),
    ],
)
def test_bad_call_shape_is_reported_under_the_task_id(
    client: CascadeClient, rdb: redis.Redis, producer: Celery, call: dict[str, Any]
) -> None:
    task_id = new_id()
    rejection = expect_rejection(
        client, rdb, send_request(producer, task_id, **call), reason="invalid_request", ident=task_id, reply_id=task_id
    )
    assert rejection.letter["task_id"] == task_id
    assert rejection.letter["request_id"] in (None, task_id)


def test_request_id_with_bad_characters_is_answered_under_the_task_id(
    client: CascadeClient, rdb: redis.Redis, producer: Celery
) -> None:
    bad_id = f"a b:c*{uuid.uuid4().hex[:8]}"
    task_id = new_id()
    send = send_request(producer, task_id, kwargs={"request": {"request_id": bad_id, "prompt": "hi"}})

    rejection = expect_rejection(client, rdb, send, reason="invalid_request", ident=task_id, reply_id=task_id)
    assert rejection.outcome is not None
    assert rejection.outcome.reply.error is not None
    assert "request_id" in rejection.outcome.reply.error.message
    assert rdb.exists(keys.reply_key(bad_id), keys.events_stream(bad_id)) == 0


def test_unknown_chain(client: CascadeClient, rdb: redis.Redis, producer: Celery) -> None:
    request_id = new_id()
    task_id = new_id()
    request = {"request_id": request_id, "prompt": "hi", "chain": "nope"}
    send = send_request(producer, task_id, kwargs={"request": request})

    rejection = expect_rejection(client, rdb, send, reason="unknown_chain", ident=request_id, reply_id=request_id)
    assert rejection.outcome is not None
    assert rejection.outcome.reply.error is not None
    assert "nope" in rejection.outcome.reply.error.message


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"messages": [{"role": "user", "content": "m"}] * (MAX_MESSAGES + 1)}, id="too-many-messages"),
        pytest.param({"prompt": "x" * (MAX_INPUT_CHARS + 1)}, id="too-many-characters"),
    ],
)
def test_oversize_request(client: CascadeClient, rdb: redis.Redis, producer: Celery, fields: dict[str, Any]) -> None:
    request_id = new_id()
    send = send_request(producer, new_id(), kwargs={"request": {"request_id": request_id, **fields}})

    rejection = expect_rejection(client, rdb, send, reason="request_too_large", ident=request_id, reply_id=request_id)
    assert rejection.outcome is not None
    assert rejection.outcome.reply.error is not None
    assert "limit" in rejection.outcome.reply.error.message


def test_request_at_the_limits_is_served(client: CascadeClient) -> None:
    """The limits are inclusive: exactly max_messages messages of max_input_chars in all run."""
    per_message = MAX_INPUT_CHARS // MAX_MESSAGES
    messages = [{"role": "user", "content": "y" * per_message} for _ in range(MAX_MESSAGES)]
    outcome = run_request(client, messages=messages, chain="default")
    assert outcome.reply.status == "succeeded"
    assert dead_letters_for(client.redis, outcome.request_id) == []
