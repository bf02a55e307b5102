"""The message screen (worker/boundary/envelope.py) on queue entries built by hand and by Celery itself,
and what the transport (worker/boundary/transport.py) does with a refusal, on fakeredis."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
import redis
from celery import Celery

from tasks.contract import keys
from tasks.contract.schemas import REQUEST_ID_HEADER, TASK_NAME
from worker.boundary import envelope, transport
from worker.boundary.envelope import CASCADE_TASKS, Refusal, screen
from worker.celery_app import create_app
from worker.runtime import WorkerRuntime, build_runtime

from .conftest import SettingsFactory

LIMIT = 10_000


def celery_entry(name: str = TASK_NAME, **options: Any) -> dict[str, Any]:
    """The queue entry Celery's own producer writes for ``send_task(name, **options)``."""
    app = Celery("unit-producer", broker="memory://", set_as_current=False)
    app.conf.update(task_serializer="json")
    options.setdefault("kwargs", {"request": {"prompt": "hi"}})
    with app.connection_for_write() as connection:
        app.send_task(name, queue="chat", connection=connection, **options)
        entry: dict[str, Any] = connection.default_channel._get("chat")
    app.close()
    return entry


def entry_with(body: Any = None, **headers: Any) -> dict[str, Any]:
    """A valid entry with ``headers`` changed (None removes one) and the body ``body``."""
    entry = celery_entry(task_id="t-1")
    for name, value in headers.items():
        if value is None:
            entry["headers"].pop(name, None)
        else:
            entry["headers"][name] = value
    if body is not None:
        entry["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    return entry


def refused(entry: dict[str, Any] | bytes | str) -> Refusal:
    raw = entry if isinstance(entry, (bytes, str)) else json.dumps(entry).encode()
    verdict = screen(raw, max_body_bytes=LIMIT)
    assert isinstance(verdict, Refusal), verdict
    return verdict


def test_a_celery_task_message_passes_as_sent() -> None:
    entry = celery_entry(task_id="r-1", headers={REQUEST_ID_HEADER: "r-1", "traceparent": "00-ab-cd-01"})
    delivered = screen(json.dumps(entry).encode(), max_body_bytes=LIMIT)
    assert isinstance(delivered, dict)
    assert delivered["body"] == entry["body"] and delivered["headers"] == entry["headers"]
    assert delivered["properties"]["delivery_tag"] == entry["properties"]["delivery_tag"]
    assert delivered["properties"]["delivery_info"] == {"exchange": "", "routing_key": "chat"}


def test_every_registered_cascade_task_is_accepted(make_settings: SettingsFactory) -> None:
    """A new ``cascade.*`` task (``cascade.image``) must be added to CASCADE_TASKS."""
    import tasks.chat  # registers cascade.chat
    import tasks.image  # noqa: F401 - registers cascade.image

    app = create_app(make_settings())
    registered = {name for name in app.tasks if name.startswith("cascade.")}
    assert {TASK_NAME, "cascade.image"} <= registered
    assert registered <= CASCADE_TASKS
    assert create_app(make_settings()).conf.task_routes["cascade.image"] == {"queue": "chat"}
    assert "celery.chord_unlock" in app.tasks and "celery.chord_unlock" not in CASCADE_TASKS


@pytest.mark.parametrize(
    "raw",
    [
        b"this is not a celery message {",
        b"[1, 2, 3]",
        b'"a string"',
        b"null",
        b'{"hello": 1}',
        b"\xff\xfe",
        b"[" * 100_000,
        b"",
    ],
)
def test_an_entry_that_is_no_envelope_is_undecodable_and_kept_raw(raw: bytes) -> None:
    refusal = refused(raw)
    assert refusal.reason == "undecodable"
    assert refusal.preview == raw
    assert refusal.task_id is None and refusal.request_id is None


@pytest.mark.parametrize(
    ("headers", "reason", "mentions"),
    [
        ({"task": ["cascade.chat"]}, "invalid_task", "'task' header"),
        ({"task": None}, "unknown_message", "task"),
        ({"id": None}, "invalid_task", "'id'"),
        ({"id": 7}, "invalid_task", "'id'"),
        ({"id": "x" * 300}, "invalid_task", "'id'"),
        ({"id": "line\nbreak"}, "invalid_task", "'id'"),
        ({"task": "celery.chord_unlock"}, "unknown_task", "celery.chord_unlock"),
        ({"task": "cascade.nope"}, "unknown_task", "cascade.nope"),
        ({"eta": "2000-01-01T00:00:00+00:00"}, "unsupported_option", "eta"),
        ({"expires": "2000-01-01T00:00:00+00:00"}, "unsupported_option", "expires"),
        ({"countdown": 5}, "unsupported_option", "countdown"),
        ({"timelimit": [1, 1]}, "unsupported_option", "timelimit"),
        ({"timelimit": "soon"}, "unsupported_option", "timelimit"),
        ({"soft_time_limit": 1}, "unsupported_option", "soft_time_limit"),
        ({"compression": "application/x-bz2"}, "unsupported_option", "compression"),
        ({"callbacks": [{"task": "x"}]}, "unsupported_option", "callbacks"),
        ({"chord": {"task": "x"}}, "unsupported_option", "chord"),
        ({"group": "g-1"}, "unsupported_option", "group"),
        ({"stamps": {"a": 1}}, "unsupported_option", "stamps"),
        ({"retries": "3"}, "invalid_task", "retries"),
        ({"retries": True}, "invalid_task", "retries"),
        ({"ignore_result": "yes"}, "invalid_task", "ignore_result"),
        ({"shadow": 1}, "invalid_task", "shadow"),
        ({REQUEST_ID_HEADER: "a b"}, "invalid_task", REQUEST_ID_HEADER),
        ({"cascade_submitted_at": "now"}, "invalid_task", "cascade_submitted_at"),
        ({"is_eager": True}, "invalid_task", "is_eager"),
        ({"delivery_info": {}}, "invalid_task", "delivery_info"),
        ({"_private": 1}, "invalid_task", "_private"),
        ({"x-custom": {"nested": 1}}, "invalid_task", "x-custom"),
        ({"x-custom": "y" * 9_000}, "invalid_task", "x-custom"),
        ({f"x-{n}": "y" * 8_000 for n in range(5)}, "invalid_task", "headers"),
    ],
)
def test_headers_of_the_wrong_type_or_with_refused_options(headers: dict[str, Any], reason: str, mentions: str) -> None:
    refusal = refused(entry_with(**headers))
    assert (refusal.reason, mentions in refusal.detail) == (reason, True), refusal


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"content-type": "application/x-python-serialize"}, "content_disallowed"),
        ({"content-type": None}, "content_disallowed"),
        ({"content-encoding": "binary"}, "content_disallowed"),
        ({"properties": None}, "invalid_task"),
        ({"properties": {"body_encoding": "base64"}}, "invalid_task"),
        ({"body": 42}, "undecodable"),
        ({"body": "!!not base64!!"}, "undecodable"),
        ({"body": base64.b64encode(b"\xff\xfe").decode()}, "undecodable"),
        ({"body": base64.b64encode(b"[" * 7_000).decode()}, "undecodable"),
        ({"headers": ["task"]}, "unknown_message"),
    ],
)
def test_envelope_fields_of_the_wrong_kind(change: dict[str, Any], reason: str) -> None:
    entry = celery_entry(task_id="t-1")
    entry.update(change)
    assert refused(entry).reason == reason


def test_the_body_encoding_must_be_base64() -> None:
    entry = celery_entry(task_id="t-1")
    entry["properties"]["body_encoding"] = "utf-8"
    assert refused(entry).reason == "content_disallowed"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"args": [], "kwargs": {}}, "invalid_task"),
        ([[], {}], "invalid_task"),
        ([7, {}, {}], "invalid_task"),
        ([[], ["request"], {}], "invalid_task"),
        ([[], {}, []], "invalid_task"),
        ([[], {}, {"link": None}], "invalid_task"),
        ([[], {}, {"callbacks": [{"task": "x"}]}], "unsupported_option"),
        ([[], {}, {"chain": [{"task": "x"}]}], "unsupported_option"),
        ([[], {"request": {"__type__": "datetime", "__value__": "garbage"}}, {}], "undecodable"),
    ],
)
def test_bodies_of_the_wrong_shape(body: Any, reason: str) -> None:
    assert refused(entry_with(body=body)).reason == reason


def test_a_body_over_the_cap_is_refused_with_the_ids_to_answer() -> None:
    entry = celery_entry(task_id="t-9", kwargs={"request": {"prompt": "x" * LIMIT}}, headers={REQUEST_ID_HEADER: "r-9"})
    refusal = refused(entry)
    assert (refusal.reason, refusal.task_id, refusal.request_id) == ("request_too_large", "t-9", "r-9")
    assert "exceeds" in refusal.detail


def test_an_entry_far_over_the_cap_is_not_parsed() -> None:
    raw = b"{" + b" " * (LIMIT * envelope.HARD_LIMIT_FACTOR + envelope.MAX_HEADERS_BYTES)
    refusal = refused(raw)
    assert refusal.reason == "request_too_large" and refusal.task_id is None


def test_the_preview_is_the_decoded_body_where_there_is_one() -> None:
    refusal = refused(entry_with(body=[[], {"request": {"prompt": "MARKER"}}, {}], eta="2030-01-01T00:00:00"))
    assert isinstance(refusal.preview, bytes) and b"MARKER" in refusal.preview


# --- the transport: what a refusal leaves behind, and when Redis fails -----------------------------


class StubChannel:
    """The part of a kombu channel ``Channel._admit`` uses."""

    def __init__(self) -> None:
        self.put_back: list[tuple[str, bytes]] = []

    def _put_back(self, key: str, item: bytes) -> None:
        self.put_back.append((key, item))


@pytest.fixture
def runtime(
    fake_redis: fakeredis.FakeRedis, make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[WorkerRuntime]:
    built = build_runtime(make_settings(max_message_bytes=LIMIT), fake_redis, worker_name="unit-worker")
    monkeypatch.setattr(transport, "get_runtime", lambda: built)
    yield built


def admit(item: bytes) -> tuple[dict[str, Any] | None, StubChannel]:
    stub = StubChannel()
    return transport.Channel._admit(stub, item, "chat", "chat"), stub


def dead(client: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in client.lrange(keys.DEAD_LETTERS, 0, -1)]


def test_a_refused_entry_is_dead_lettered_and_answered_at_its_header_id(
    runtime: WorkerRuntime, fake_redis: fakeredis.FakeRedis
) -> None:
    entry = celery_entry(task_id="t-2", headers={REQUEST_ID_HEADER: "r-2"}, countdown=60)
    delivered, stub = admit(json.dumps(entry).encode())
    assert delivered is None and stub.put_back == []
    [letter] = dead(fake_redis)
    assert (letter["reason"], letter["task_id"], letter["request_id"]) == ("unsupported_option", "t-2", "r-2")
    reply = runtime.replies.get("r-2")
    assert reply is not None and reply.error is not None and reply.error.type == "invalid_request"


def test_a_refused_entry_without_the_header_is_not_answered(
    runtime: WorkerRuntime, fake_redis: fakeredis.FakeRedis
) -> None:
    admit(json.dumps(entry_with(eta="2030-01-01T00:00:00")).encode())
    assert [e["reason"] for e in dead(fake_redis)] == ["unsupported_option"]
    assert runtime.replies.get("t-1") is None


def test_an_entry_refused_again_is_dead_lettered_again_but_answered_once(
    runtime: WorkerRuntime, fake_redis: fakeredis.FakeRedis
) -> None:
    entry = celery_entry(task_id="t-3", headers={REQUEST_ID_HEADER: "r-3"}, expires=60)
    admit(json.dumps(entry).encode())
    admit(json.dumps(entry).encode())
    assert len(dead(fake_redis)) == 2, "each entry taken off the queue leaves its dead letter"
    assert fake_redis.xlen(keys.events_stream("r-3")) == 1, "one error event, one reply"


def test_when_redis_is_gone_the_entry_goes_back_and_the_error_goes_to_kombu(
    runtime: WorkerRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    def lost(*_args: Any, **_kwargs: Any) -> None:
        raise redis.ConnectionError("connection lost")

    monkeypatch.setattr(runtime.dead_letters, "push", lost)
    with pytest.raises(redis.ConnectionError):
        admit(b"not a message")
    stub = StubChannel()
    with pytest.raises(redis.ConnectionError):
        transport.Channel._admit(stub, b"not a message", "chat", "chat\x06\x163")
    assert stub.put_back == [("chat\x06\x163", b"not a message")]


def test_when_the_dead_letter_is_refused_the_entry_is_dropped_and_logged(
    runtime: WorkerRuntime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def full(*_args: Any, **_kwargs: Any) -> None:
        raise redis.ResponseError("OOM command not allowed when used memory > 'maxmemory'")

    monkeypatch.setattr(runtime.dead_letters, "push", full)
    with caplog.at_level(logging.ERROR, logger="worker.boundary.transport"):
        delivered, stub = admit(b"not a message SECRET-PROMPT")
    assert delivered is None and stub.put_back == [], "not put back: it would be taken again at once"
    [record] = caplog.records
    assert "dropped" in record.getMessage() and "ResponseError" in record.getMessage()
    assert "SECRET-PROMPT" not in record.getMessage()


def test_what_a_worker_sends_itself_passes(make_settings: SettingsFactory) -> None:
    """A worker's hand-offs (``apply_async``) and resends (``send_task``) would carry its own
    ``task_time_limit`` (Celery adds a registered task's limits): the worker app leaves them out."""
    from tasks.chat import chat

    app = create_app(make_settings())
    app.conf.broker_url = "memory://"
    app.conf.broker_transport = None
    app.conf.result_backend = "cache+memory://"
    assert app.conf.task_time_limit
    with app.connection_for_write() as connection:
        chat.apply_async(kwargs={"request": {"prompt": "hi"}}, queue="chat", connection=connection)
        app.send_task(TASK_NAME, kwargs={"request": {"prompt": "hi"}}, queue="chat", connection=connection)
        sent = [connection.default_channel._get("chat") for _ in range(2)]
    app.close()
    for entry in sent:
        assert entry["headers"]["timelimit"] == [None, None]
        assert isinstance(screen(json.dumps(entry).encode(), max_body_bytes=LIMIT), dict)
