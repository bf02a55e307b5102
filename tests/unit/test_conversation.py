"""The producer's loop helpers (tasks.producer.conversation): a reply's message appended as is,
tool results appended as tool messages, image files as content parts — each conversation they
build is a valid next request."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from tasks.contract.schemas import AssistantReply, ChatReply, ChatRequest, FunctionCall, ReplyMeta, ToolCall
from tasks.producer.conversation import (
    image_file_part,
    image_part,
    tool_calls_of,
    user_message,
    with_reply,
    with_tool_results,
)

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def calling_reply() -> ChatReply:
    call = ToolCall(id="call_1", function=FunctionCall(name="get_weather", arguments='{"city": "Paris"}'))
    meta = ReplyMeta(model="m", finish_reason="tool_calls")
    return ChatReply(
        request_id="r-1", status="succeeded", replies=[AssistantReply(content=None, tool_calls=[call], meta=meta)]
    )


def test_a_loop_turn_builds_a_valid_next_request() -> None:
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    reply = calling_reply()
    calls = tool_calls_of(reply)
    assert [call.function.name for call in calls] == ["get_weather"]
    following = with_tool_results(with_reply(messages, reply), {calls[0].id: "18 C, clear"})
    assert following[1] == {
        "role": "assistant",
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ],
    }
    assert following[2] == {"role": "tool", "tool_call_id": "call_1", "content": "18 C, clear"}
    request = ChatRequest.model_validate({"messages": following, "tools": TOOLS})
    assert [message.role for message in request.conversation] == ["user", "assistant", "tool"]
    assert messages == [{"role": "user", "content": "Weather in Paris?"}], "the caller's list is left as it was"


def test_a_text_reply_has_no_calls_and_a_missing_choice_is_an_error() -> None:
    reply = ChatReply(
        request_id="r-2", status="succeeded", replies=[AssistantReply(content="Sunny.", meta=ReplyMeta(model="m"))]
    )
    assert tool_calls_of(reply) == [] and tool_calls_of(reply, choice=3) == []
    with pytest.raises(ValueError, match="no choice 1"):
        with_reply([], reply, choice=1)


def test_image_parts_are_data_urls_a_request_accepts(tmp_path: Path) -> None:
    path = tmp_path / "cat.png"
    path.write_bytes(PNG)
    part = image_file_part(path, detail="low")
    assert part["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert part["image_url"]["detail"] == "low"
    request = ChatRequest.model_validate({"messages": [user_message("What is this?", [path])]})
    assert len(request.conversation[0].image_urls()) == 1
    assert user_message("plain") == {"role": "user", "content": "plain"}


def test_an_unknown_image_type_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not one of"):
        image_part(b"BM....", "image/bmp")
    odd = tmp_path / "blob.unknownext"
    odd.write_bytes(PNG)
    with pytest.raises(ValueError, match="cannot tell"):
        image_file_part(odd)
