"""The wire schemas (tasks/schemas.py) and the drift check of the JSON Schema files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from tasks import schema_export
from tasks.schemas import (
    MAX_MESSAGES,
    AssistantReply,
    AttemptRecord,
    ChainMeta,
    ChatReply,
    ChatRequest,
    ErrorInfo,
    ReplyMeta,
    StreamEvent,
    Usage,
)


def _request(**fields: Any) -> ChatRequest:
    data: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], **fields}
    return ChatRequest.model_validate(data)


def test_messages_are_kept_as_given() -> None:
    request = _request(messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert [(m.role, m.content) for m in request.conversation] == [("system", "be brief"), ("user", "hi")]
    assert request.chain == "default"
    assert request.stream is True
    assert request.request_id is None


def test_prompt_shorthand_becomes_a_user_message() -> None:
    request = ChatRequest.model_validate({"prompt": "What is NLP?"})
    assert [(m.role, m.content) for m in request.conversation] == [("user", "What is NLP?")]
    assert request.prompt is None


def test_system_prompt_comes_first() -> None:
    request = ChatRequest.model_validate({"prompt": "What is NLP?", "system_prompt": "Be terse."})
    assert [(m.role, m.content) for m in request.conversation] == [("system", "Be terse."), ("user", "What is NLP?")]
    assert request.prompt is None and request.system_prompt is None


def test_normalised_request_validates_again_unchanged() -> None:
    request = ChatRequest.model_validate({"prompt": "p", "system_prompt": "s", "request_id": "r1"})
    again = ChatRequest.model_validate(request.model_dump(exclude_none=True))
    assert again == request


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"messages": []},
        {"messages": [{"role": "user", "content": "x"}], "prompt": "y"},
        {"messages": [{"role": "user", "content": "x"}], "system_prompt": "y"},
        {"system_prompt": "only a system prompt"},
        {"messages": [{"role": "tool", "content": "x"}]},
        {"messages": [{"role": "User", "content": "x"}]},
        {"messages": [{"role": "user"}]},
        {"messages": [{"role": "user", "content": "x", "name": "has space"}]},
        {"messages": [{"role": "user", "content": "x", "surprise": 1}]},
        {"prompt": "x", "unknown_field": 1},
        {"prompt": "x", "chain": "bad chain"},
        {"prompt": "x", "timeout_s": 0},
        {"prompt": "x", "stream": "sometimes"},
    ],
)
def test_invalid_requests_are_refused(data: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ChatRequest.model_validate(data)


def test_message_count_is_capped_by_the_schema() -> None:
    messages = [{"role": "user", "content": "x"}] * (MAX_MESSAGES + 1)
    with pytest.raises(ValidationError):
        ChatRequest.model_validate({"messages": messages})


@pytest.mark.parametrize("request_id", ["a", "req-1", "A.b_c-9", "0" * 128])
def test_request_id_alphabet_accepts(request_id: str) -> None:
    assert _request(request_id=request_id).request_id == request_id


@pytest.mark.parametrize(
    "request_id", ["", "-leading-dash", ".hidden", "has space", "a:b", "a{b}", "a*", "a?", "é", "0" * 129]
)
def test_request_id_alphabet_refuses(request_id: str) -> None:
    with pytest.raises(ValidationError):
        _request(request_id=request_id)


@pytest.mark.parametrize(
    "key", ["api_key", "base_url", "api_base_url", "model", "azure_endpoint", "headers", "token", "url"]
)
def test_generation_kwargs_refuse_routing_keys(key: str) -> None:
    with pytest.raises(ValidationError, match=key):
        _request(generation_kwargs={key: "https://attacker.invalid"})


def test_generation_kwargs_keep_sampling_and_unknown_keys() -> None:
    request = _request(generation_kwargs={"max_tokens": 5, "temperature": 0.5, "stop": ["\n"], "presence_penalty": 1})
    dumped = request.generation_kwargs.model_dump(exclude_none=True)
    assert dumped == {"max_tokens": 5, "temperature": 0.5, "stop": ["\n"], "presence_penalty": 1}


@pytest.mark.parametrize("kwargs", [{"max_tokens": 0}, {"temperature": 2.5}, {"top_p": -0.1}, {"stop": ["x"] * 17}])
def test_generation_kwargs_ranges(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        _request(generation_kwargs=kwargs)


def test_metadata_key_cap() -> None:
    assert len(_request(metadata={f"k{i}": i for i in range(64)}).metadata) == 64
    with pytest.raises(ValidationError, match="64 keys"):
        _request(metadata={f"k{i}": i for i in range(65)})


def _reply() -> ChatReply:
    meta = ReplyMeta(model="m", finish_reason="stop", usage=Usage(prompt_tokens=2, completion_tokens=3, total_tokens=5))
    attempts = [
        AttemptRecord(provider="a", index=0, attempt=1, outcome="failed", error_type="timeout"),
        AttemptRecord(provider="b", index=1, attempt=2, outcome="succeeded", chunks=3),
    ]
    return ChatReply(
        request_id="r1",
        status="succeeded",
        replies=[AssistantReply(content="hello", meta=meta)],
        meta=ChainMeta(provider="b", total_attempts=2, failed_chat_generators=["a"], attempts=attempts),
        metadata={"trace": "t-1"},
    )


def test_chat_reply_round_trips_through_json() -> None:
    reply = _reply()
    again = ChatReply.model_validate_json(reply.model_dump_json())
    assert again == reply
    assert again.replies[0].meta.usage.total_tokens == 5
    assert again.meta.attempts[0].error_type == "timeout"


def test_stream_event_round_trip_and_terminal_flag() -> None:
    chunk = StreamEvent(type="chunk", request_id="r1", seq=1, delta="he", provider="b", attempt=2)
    done = StreamEvent(type="done", request_id="r1", seq=5, reply=_reply())
    error = StreamEvent(type="error", request_id="r1", seq=6, error=ErrorInfo(type="x", message="y"))
    for event in (chunk, done, error):
        assert StreamEvent.model_validate_json(event.model_dump_json(exclude_none=True)) == event
    assert not chunk.is_terminal
    assert done.is_terminal and error.is_terminal
    assert json.loads(chunk.model_dump_json(exclude_none=True))["v"] == 1


@pytest.mark.parametrize(
    "data",
    [
        {"type": "chunk", "request_id": "r", "seq": -1},
        {"type": "progress", "request_id": "r", "seq": 0},
        {"type": "chunk", "request_id": "r", "seq": 0, "v": 2},
        {"type": "chunk", "request_id": "r", "seq": 0, "surprise": True},
    ],
)
def test_stream_event_refuses_bad_events(data: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        StreamEvent.model_validate(data)


def test_reply_status_is_restricted() -> None:
    with pytest.raises(ValidationError):
        ChatReply(request_id="r", status="maybe")  # type: ignore[arg-type]


# --- drift of the checked-in JSON Schemas ----------------------------------------------


def test_checked_in_schemas_match_the_models() -> None:
    assert schema_export.main(["--check"]) == 0


def _copy_schemas(tmp_path: Path) -> Path:
    target = tmp_path / "schemas"
    shutil.copytree(schema_export.DEFAULT_DIR, target)
    return target


def test_check_fails_when_a_file_differs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = _copy_schemas(tmp_path)
    assert schema_export.main(["--check", "--dir", str(target)]) == 0
    path = target / "chat_reply.schema.json"
    schema = json.loads(path.read_text())
    schema["title"] = "Drifted"
    path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
    assert schema_export.main(["--check", "--dir", str(target)]) == 1
    assert "chat_reply.schema.json" in capsys.readouterr().err


def test_check_fails_when_a_file_is_missing(tmp_path: Path) -> None:
    target = _copy_schemas(tmp_path)
    (target / "stream_event.schema.json").unlink()
    assert schema_export.main(["--check", "--dir", str(target)]) == 1


def test_export_rewrites_stale_files(tmp_path: Path) -> None:
    target = _copy_schemas(tmp_path)
    (target / "chat_request.schema.json").write_text("{}\n")
    assert schema_export.main(["--dir", str(target)]) == 0
    assert schema_export.main(["--check", "--dir", str(target)]) == 0
    schema = json.loads((target / "chat_request.schema.json").read_text())
    assert "messages" in schema["properties"]
