"""The Celery task ``cascade.chat`` (tasks/chat.py), run eagerly with ``apply`` on fakeredis."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import fakeredis
import pytest
from celery.utils.saferepr import saferepr

from settings import Settings
from tasks.chat import chat
from tasks.contract import keys
from tasks.contract.schemas import ChatReply, StreamEvent
from tests.support.sessions import opened
from worker.runtime import WorkerRuntime, build_runtime
from worker.state import lua

SettingsFactory = Callable[..., Settings]  # the make_settings fixture of conftest.py


@pytest.fixture
def runtime(
    fake_redis: fakeredis.FakeRedis, make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> WorkerRuntime:
    settings = make_settings({"steady": {"text": "all good"}}, {"default": ["steady"]})
    built = build_runtime(settings, fake_redis, worker_name="unit-worker")
    monkeypatch.setattr("tasks.chat.get_runtime", lambda: built)
    return built


def run_task(task_id: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    result: dict[str, Any] = chat.apply(args=args, kwargs=kwargs, task_id=task_id).get(disable_sync_subtasks=False)
    return result


def dead(client: fakeredis.FakeRedis) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in client.lrange(keys.DEAD_LETTERS, 0, -1)]


def events(client: fakeredis.FakeRedis, request_id: str) -> list[StreamEvent]:
    entries = client.xrange(keys.events_stream(request_id))
    return [StreamEvent.model_validate_json(fields[b"event"]) for _id, fields in entries]


def test_a_valid_request_runs(runtime: WorkerRuntime, fake_redis: fakeredis.FakeRedis) -> None:
    result = run_task("task-1", request={"request_id": "req-1", "prompt": "hi"})
    reply = ChatReply.model_validate(result)
    assert reply.status == "succeeded" and reply.request_id == "req-1"
    assert reply.replies[0].content == "all good"
    assert runtime.replies.get("req-1") == reply
    assert [e.type for e in events(fake_redis, "req-1")][-1] == "done"
    assert dead(fake_redis) == []


def test_a_new_request_is_opened_and_closed_by_one_script_each(
    runtime: WorkerRuntime, fake_redis: fakeredis.FakeRedis, caplog: pytest.LogCaptureFixture
) -> None:
    commands: list[str] = []
    real_execute = fake_redis.execute_command
    scripts = {key: script.name for script in lua.ALL for key in (script.sha, script.source)}

    def counting(*args: Any, **options: Any) -> Any:
        # A script by name, once per call: EVALSHA, and EVAL after it while Redis does not know it.
        name = scripts.get(args[1]) if args[0] in ("EVALSHA", "EVAL") else None
        if name is None or not (commands and commands[-1] == name and args[0] == "EVAL"):
            commands.append(name or str(args[0]))
        return real_execute(*args, **options)

    fake_redis.execute_command = counting  # type: ignore[method-assign]
    with caplog.at_level("INFO"):
        run_task("task-rt", request={"request_id": "req-rt", "prompt": "hi"})
    assert "resuming" not in caplog.text
    # The opening script (lease, read-ahead, start event) and the closing one (reply, terminal
    # event, lease release); between them only chunk events (the emit script), and no read of a
    # lost run.
    assert [command for command in commands if command != "emit"] == ["open", "finish"]
    assert "XRANGE" not in commands and "XREVRANGE" not in commands
    types = [e.type for e in events(fake_redis, "req-rt")]
    assert types[0] == "start" and types[-1] == "done" and set(types[1:-1]) == {"chunk"}


def test_the_task_id_stands_in_for_a_missing_request_id(runtime: WorkerRuntime) -> None:
    result = run_task("task-2", request=json.dumps({"prompt": "hi"}))
    assert result["request_id"] == "task-2" and result["status"] == "succeeded"


def test_an_invalid_request_is_rejected_with_a_reply_and_a_dead_letter(
    runtime: WorkerRuntime, fake_redis: fakeredis.FakeRedis
) -> None:
    body = {"request_id": "req-3", "messages": [{"role": "robot", "content": "x"}]}
    result = run_task("task-3", request=body)
    assert result["status"] == "failed" and result["error"]["type"] == "invalid_request"
    stored = runtime.replies.get("req-3")
    assert stored is not None and stored.error is not None and "messages.0.role" in stored.error.message
    assert [(e.type, e.seq) for e in events(fake_redis, "req-3")] == [("error", 0)]
    [letter] = dead(fake_redis)
    assert (letter["reason"], letter["request_id"], letter["task_id"]) == ("invalid_request", "req-3", "task-3")
    assert json.loads(letter["body"]) == body


def test_an_unknown_chain_tries_no_provider(runtime: WorkerRuntime, fake_redis: fakeredis.FakeRedis) -> None:
    result = run_task("task-4", request={"request_id": "req-4", "prompt": "hi", "chain": "nope"})
    assert result["error"]["type"] == "unknown_chain"
    assert result["meta"]["attempts"] == []
    assert [e.type for e in events(fake_redis, "req-4")] == ["error"]


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [(({"prompt": "hi"},), {}), ((), {"request": {"prompt": "hi"}, "priority": 1}), ((), {"req": {"prompt": "hi"}})],
)
def test_wrong_call_shapes_are_rejected(
    runtime: WorkerRuntime, fake_redis: fakeredis.FakeRedis, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    result = run_task("task-5", *args, **kwargs)
    assert result["status"] == "failed" and result["error"]["type"] == "invalid_request"
    assert "one keyword argument 'request'" in result["error"]["message"]
    assert runtime.replies.get("task-5") is not None
    assert dead(fake_redis)[0]["task_id"] == "task-5"


def test_no_usable_id_means_a_dead_letter_only(runtime: WorkerRuntime, fake_redis: fakeredis.FakeRedis) -> None:
    result = run_task("bad:task id", request={"prompt": "hi"})
    assert result["status"] == "failed"
    assert [letter["reason"] for letter in dead(fake_redis)] == ["invalid_request"]
    assert fake_redis.keys("cascade:reply:*") == []
    assert fake_redis.keys("cascade:events:*") == []


def test_a_redelivered_request_is_not_run_again(runtime: WorkerRuntime, fake_redis: fakeredis.FakeRedis) -> None:
    first = run_task("task-6", request={"request_id": "req-6", "prompt": "hi"})
    count = fake_redis.xlen(keys.events_stream("req-6"))
    again = run_task("task-6", request={"request_id": "req-6", "prompt": "hi"})
    assert again == first
    assert fake_redis.xlen(keys.events_stream("req-6")) == count


def test_a_redelivered_invalid_request_keeps_its_first_reply(
    runtime: WorkerRuntime, fake_redis: fakeredis.FakeRedis
) -> None:
    body = {"request_id": "req-7", "prompt": "hi", "chain": "nope"}
    first = run_task("task-7", request=body)
    again = run_task("task-7", request=body)
    assert again == first
    assert [e.type for e in events(fake_redis, "req-7")] == ["error"]
    assert len(dead(fake_redis)) == 1  # a redelivered copy of an answered request is not recorded twice


def test_celerys_shortened_repr_of_the_reply_still_names_its_status() -> None:
    longest_id = "r" * 128
    reply = ChatReply(request_id=longest_id, status="cancelled").model_dump(mode="json")
    assert "'status': 'cancelled'" in saferepr(reply, chat.resultrepr_maxsize)


def test_an_invalid_copy_of_a_running_request_is_only_dead_lettered(
    runtime: WorkerRuntime, fake_redis: fakeredis.FakeRedis
) -> None:
    with opened(fake_redis, "req-8", worker="other/1", start_chain="default") as original:
        result = run_task("task-8", request={"request_id": "req-8", "prompt": "hi", "chain": "nope"})
        assert result["status"] == "duplicate" and result["error"]["type"] == "unknown_chain"
        assert runtime.replies.get("req-8") is None
        assert [e.type for e in events(fake_redis, "req-8")] == ["start"]
        assert [(letter["reason"], letter["request_id"]) for letter in dead(fake_redis)] == [("unknown_chain", "req-8")]
        assert original.finish("done", ChatReply(request_id="req-8", status="succeeded"))  # the answer stands
    stored = runtime.replies.get("req-8")
    assert stored is not None and stored.status == "succeeded"
    assert [e.type for e in events(fake_redis, "req-8")] == ["start", "done"]


@pytest.mark.parametrize(
    ("handoff", "reason"),
    [
        ({"start_index": 5}, "start_index 5 is past the chain"),  # forged, or from a deploy with a longer chain
        ({"deadline_at": float("nan")}, "finite"),
    ],
)
def test_a_bad_hand_off_is_answered_and_dead_lettered(
    runtime: WorkerRuntime, fake_redis: fakeredis.FakeRedis, handoff: dict[str, Any], reason: str
) -> None:
    state = {"start_index": 0, "next_seq": 1, "queue_hops": 1, "deadline_at": 10.0**12, "started_at": 0.0, **handoff}
    result = run_task("task-9", request={"request_id": "req-9", "prompt": "hi"}, handoff=state)
    assert result["status"] == "failed" and result["error"]["type"] == "invalid_request"
    assert reason in result["error"]["message"]
    stored = runtime.replies.get("req-9")
    assert stored is not None and stored.status == "failed"
    assert [e.type for e in events(fake_redis, "req-9")] == ["error"]
    assert [letter["reason"] for letter in dead(fake_redis)] == ["invalid_request"]
