"""The Celery task ``cascade.image`` (tasks/image.py, tasks/entry.py), run eagerly with ``apply`` on
fakeredis: bad input becomes a ``failed`` ``ImageReply`` naming the field plus a dead letter,
never an exception; a chat chain is not an image chain, nor the other way round."""

from __future__ import annotations

import json
from typing import Any

import fakeredis
import pytest

from settings import ScriptedConfig, Settings
from settings.providers import OpenAIImageConfig
from tasks.chat import chat
from tasks.contract import keys
from tasks.contract.images import ImageReply
from tasks.contract.schemas import ChatReply, StreamEvent
from tasks.image import image
from worker.runtime import WorkerRuntime, build_runtime


@pytest.fixture
def runtime(fake_redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch) -> WorkerRuntime:
    settings = Settings(
        providers={"painter": OpenAIImageConfig(model="dall-e-3"), "steady": ScriptedConfig(text="all good")},
        chains={"images": ["painter"], "default": ["steady"]},
    )
    built = build_runtime(settings, fake_redis, worker_name="unit-worker")
    monkeypatch.setattr("tasks.image.get_runtime", lambda: built)
    monkeypatch.setattr("tasks.chat.get_runtime", lambda: built)
    return built


def run_image(task_id: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    result: dict[str, Any] = image.apply(args=args, kwargs=kwargs, task_id=task_id).get(disable_sync_subtasks=False)
    return result


def dead(client: fakeredis.FakeRedis) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in client.lrange(keys.DEAD_LETTERS, 0, -1)]


def last_event(client: fakeredis.FakeRedis, request_id: str) -> StreamEvent:
    entries = client.xrange(keys.events_stream(request_id))
    return StreamEvent.model_validate_json(entries[-1][1][b"event"])


@pytest.mark.parametrize(
    ("request_fields", "reason", "named"),
    [
        ({"prompt": ""}, "invalid_request", "prompt"),
        ({"prompt": "   "}, "invalid_request", "prompt"),
        ({"prompt": "a cat", "n": 11}, "invalid_request", "n"),
        ({"prompt": "a cat", "size": "huge"}, "invalid_request", "size"),
        ({"prompt": "a cat", "chain": "nowhere"}, "unknown_chain", "chain"),
        ({"prompt": "a cat", "chain": "default"}, "unknown_chain", "chain"),
    ],
)
def test_bad_input_is_a_failed_image_reply_naming_the_field_and_a_dead_letter(
    runtime: WorkerRuntime,
    fake_redis: fakeredis.FakeRedis,
    request_fields: dict[str, Any],
    reason: str,
    named: str,
) -> None:
    result = run_image("task-1", request={"request_id": "bad-1", **request_fields})
    reply = ImageReply.model_validate(result)
    assert reply.status == "failed" and reply.images == []
    assert reply.error is not None and reply.error.type == reason
    assert reply.error.message.startswith(f"{named}:") or f" {named}:" in reply.error.message
    assert isinstance(runtime.replies.get("bad-1"), ImageReply)
    terminal = last_event(fake_redis, "bad-1")
    assert terminal.type == "error" and isinstance(terminal.reply, ImageReply)
    [letter] = dead(fake_redis)
    assert (letter["reason"], letter["request_id"]) == (reason, "bad-1")


def test_a_chat_request_naming_an_image_chain_is_refused(
    runtime: WorkerRuntime, fake_redis: fakeredis.FakeRedis
) -> None:
    result = chat.apply(kwargs={"request": {"request_id": "c-1", "prompt": "hi", "chain": "images"}}, task_id="t").get()
    reply = ChatReply.model_validate(result)
    assert reply.error is not None and reply.error.type == "unknown_chain"
    assert reply.error.message == "chain: 'images' is an image chain, which cascade.chat cannot run"


def test_extra_arguments_are_refused_naming_the_task(runtime: WorkerRuntime, fake_redis: fakeredis.FakeRedis) -> None:
    result = run_image("task-2", "positional", request={"request_id": "x-2", "prompt": "a cat"})
    assert result["status"] == "failed" and "cascade.image takes one keyword argument" in result["error"]["message"]
    assert [letter["reason"] for letter in dead(fake_redis)] == ["invalid_request"]


def test_a_stored_image_reply_answers_a_redelivered_copy(
    runtime: WorkerRuntime, fake_redis: fakeredis.FakeRedis
) -> None:
    stored = ImageReply(request_id="done-1", status="succeeded")
    fake_redis.set(keys.reply_key("done-1"), stored.model_dump_json())
    assert ImageReply.model_validate(run_image("task-3", request={"request_id": "done-1", "prompt": "a cat"})) == stored
    assert dead(fake_redis) == []
