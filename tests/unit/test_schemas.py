"""The wire schemas (tasks/contract/schemas.py) and the drift check of the JSON Schema files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from tasks import schema_export
from tasks.contract.schemas import (
    MAX_MESSAGES,
    AssistantReply,
    AttemptRecord,
    ChainMeta,
    ChatReply,
    ChatRequest,
    ErrorInfo,
    GeneratedImage,
    HallucinationScoreRequest,
    ImageReply,
    ImageRequest,
    ReplyMeta,
    StreamEvent,
    ToolCall,
    ToolCallDelta,
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


def test_a_v1_request_dumps_as_it_did() -> None:
    request = ChatRequest.model_validate({"prompt": "p", "system_prompt": "s", "request_id": "r1"})
    assert request.model_dump(mode="json", exclude_none=True) == {
        "request_id": "r1",
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "p"}],
        "chain": "default",
        "generation_kwargs": {},
        "stream": True,
        "metadata": {},
    }
    assert [message.text_chars() for message in request.conversation] == [1, 1]


def test_a_v1_reply_reads_as_it_did() -> None:
    stored = {
        "request_id": "r",
        "status": "succeeded",
        "replies": [{"role": "assistant", "content": "hi", "meta": {"model": "m"}}],
    }
    reply = ChatReply.model_validate(stored).replies[0]
    assert (reply.content, reply.tool_calls) == ("hi", None)


# --- chunk fragments and several choices --------------------------------------------------


def test_chunks_carry_their_choice_and_other_events_do_not() -> None:
    v1_chunk = StreamEvent.model_validate({"type": "chunk", "request_id": "r", "seq": 1, "delta": "he"})
    assert v1_chunk.index == 0
    second = StreamEvent(type="chunk", request_id="r", seq=2, delta="lo", index=1)
    assert json.loads(second.model_dump_json(exclude_none=True))["index"] == 1
    start = StreamEvent(type="start", request_id="r", seq=0, chain="default")
    assert "index" not in json.loads(start.model_dump_json(exclude_none=True))


def test_tool_call_fragments_round_trip() -> None:
    first = ToolCallDelta(index=0, id="call_1", name="get_weather", arguments_delta='{"ci')
    rest = ToolCallDelta(index=0, arguments_delta='ty": "Paris"}')
    for seq, fragment in enumerate((first, rest), start=1):
        event = StreamEvent(type="chunk", request_id="r", seq=seq, provider="p", attempt=1, tool_call=fragment)
        assert StreamEvent.model_validate_json(event.model_dump_json(exclude_none=True)) == event
    assert json.loads(
        StreamEvent(type="chunk", request_id="r", seq=3, tool_call=rest).model_dump_json(exclude_none=True)
    )["tool_call"] == {"index": 0, "arguments_delta": 'ty": "Paris"}'}


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"type": "chunk", "delta": "x", "tool_call": {"index": 0, "arguments_delta": "{"}}, "tool_call"),
        ({"type": "fallback", "tool_call": {"index": 0, "arguments_delta": "{"}}, "tool_call"),
        ({"type": "chunk", "tool_call": {"index": -1, "arguments_delta": "{"}}, "tool_call.index"),
        ({"type": "chunk", "tool_call": {"arguments_delta": "{"}}, "tool_call.index"),
        ({"type": "chunk", "tool_call": {"index": 0, "args": "{"}}, "tool_call.args"),
        ({"type": "chunk", "delta": "x", "index": -1}, "index"),
    ],
)
def test_bad_chunks_name_the_field(data: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as exc:
        StreamEvent.model_validate({"request_id": "r", "seq": 1, **data})
    assert [".".join(str(p) for p in error["loc"]) for error in exc.value.errors()] == [field]


def test_a_reply_with_tool_calls() -> None:
    calls = [ToolCall.model_validate({"id": "c1", "function": {"name": "f", "arguments": "{}"}})]
    reply = AssistantReply(content=None, tool_calls=calls, meta=ReplyMeta(model="m", finish_reason="tool_calls"))
    chat = ChatReply(request_id="r", status="succeeded", replies=[reply])
    again = ChatReply.model_validate_json(chat.model_dump_json())
    assert again == chat and again.replies[0].content is None


# --- hallucination scoring ---------------------------------------------------------------


def test_hallucination_score_request() -> None:
    config = {
        "skeleton_policy": "evidence_erase",
        "n_samples": 32,
        "m": 16,
        "temperature": 0,
        "h_star": 0.05,
        "isr_threshold": 1.0,
        "margin_extra_bits": 0,
        "B_clip": 12,
        "clip_mode": "symmetric",
    }
    assert _request(hallucination_score=config).hallucination_score == HallucinationScoreRequest.model_validate(config)
    defaults = _request(hallucination_score={}).hallucination_score
    assert defaults is not None and defaults.model_dump(exclude_none=True) == {}
    assert _request().hallucination_score is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("skeleton_policy", "open_book"),
        ("n_samples", 0),
        ("n_samples", 33),
        ("m", 0),
        ("m", 17),
        ("temperature", -0.1),
        ("temperature", 2.1),
        ("h_star", 0),
        ("h_star", 1),
        ("isr_threshold", 0),
        ("isr_threshold", float("inf")),
        ("margin_extra_bits", -0.5),
        ("margin_extra_bits", float("nan")),
        ("B_clip", 0),
        ("clip_mode", "two-sided"),
        ("seed", 1),
    ],
)
def test_hallucination_score_out_of_range_names_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as exc:
        _request(hallucination_score={field: value})
    assert [".".join(str(p) for p in error["loc"]) for error in exc.value.errors()] == [f"hallucination_score.{field}"]


def test_hallucination_meta_round_trips() -> None:
    meta = ReplyMeta(
        model="m",
        hallucination_decision="ANSWER",
        hallucination_risk=0.02,
        hallucination_rationale="ISR 1.3 >= 1.0; bound 0.02",
        hallucination_scoring_calls=13,
        hallucination_scoring_usage=Usage(prompt_tokens=10, completion_tokens=2, total_tokens=12),
    )
    assert ReplyMeta.model_validate_json(meta.model_dump_json()) == meta
    unscored = ReplyMeta.model_validate({"model": "m", "hallucination_error": "hf_local cannot be scored"})
    assert unscored.hallucination_decision is None
    with pytest.raises(ValidationError, match="hallucination_risk"):
        ReplyMeta(model="m", hallucination_risk=1.5)
    with pytest.raises(ValidationError, match="hallucination_decision"):
        ReplyMeta.model_validate({"model": "m", "hallucination_decision": "MAYBE"})


# --- the JSON Schema files describe what the models write ----------------------------------


def _validator(filename: str) -> Draft202012Validator:
    schema = json.loads((schema_export.DEFAULT_DIR / filename).read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def test_schema_files_accept_v2_instances() -> None:
    loop = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "hi"},
                    {"type": "image_url", "image_url": {"url": "https://e.com/a.png"}},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "ok"},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "generation_kwargs": {
            "n": 2,
            "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {}}},
        },
        "hallucination_score": {"h_star": 0.1},
    }
    _validator("chat_request.schema.json").validate(
        ChatRequest.model_validate(loop).model_dump(mode="json", exclude_none=True)
    )
    _validator("image_request.schema.json").validate({"prompt": "a cat", "size": "1024x1024", "n": 2})
    events = _validator("stream_event.schema.json")
    image_reply = ImageReply(
        request_id="i",
        status="succeeded",
        images=[GeneratedImage(key="cascade:image:i:0", mime_type="image/png", bytes=3)],
    )
    for event in (
        StreamEvent(type="chunk", request_id="r", seq=1, tool_call=ToolCallDelta(index=0, id="c1", name="f")),
        StreamEvent(type="done", request_id="r", seq=2, reply=_reply()),
        StreamEvent(type="image", request_id="i", seq=1, index=0, key="cascade:image:i:0", partial=True),
        StreamEvent(type="done", request_id="i", seq=2, reply=image_reply),
    ):
        events.validate(json.loads(event.model_dump_json(exclude_none=True)))
    _validator("image_reply.schema.json").validate(json.loads(image_reply.model_dump_json()))


def test_schema_files_want_replies_or_images_in_a_reply() -> None:
    events = _validator("stream_event.schema.json")
    neither = {"type": "done", "request_id": "r", "seq": 1, "reply": {"request_id": "r", "status": "failed"}}
    assert list(events.iter_errors(neither))


def test_image_request_is_exported_in_validation_mode() -> None:
    schema = json.loads((schema_export.DEFAULT_DIR / "image_request.schema.json").read_text())
    assert schema["required"] == ["prompt"]
    assert ImageRequest.model_json_schema(mode="validation")["properties"].keys() == schema["properties"].keys()


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
