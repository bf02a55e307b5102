"""Messages v2 on the wire (tasks/contract/messages.py through ChatRequest): content parts, images, tool
calls, tools, tool_choice, response_format, and errors that name the field at fault."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError

from settings import Settings
from tasks.contract.messages import MAX_CONTENT_PARTS, MAX_IMAGE_BYTES, MAX_IMAGE_URL_CHARS
from tasks.contract.schemas import (
    MAX_CHOICES,
    AssistantReply,
    ChatMessage,
    ChatRequest,
    ImagePart,
    ReplyMeta,
    TextPart,
    ToolCall,
)
from tasks.intake import read_request

SettingsFactory = Callable[..., Settings]  # the make_settings fixture of conftest.py

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 24
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 24
GIF = b"GIF89a" + b"\x00" * 24
WEBP = b"RIFF\x14\x00\x00\x00WEBPVP8 " + b"\x00" * 16

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def data_url(mime_type: str, data: bytes) -> str:
    return f"data:{mime_type};base64,{base64.b64encode(data).decode()}"


def image_message(url: str) -> dict[str, Any]:
    return {
        "role": "user",
        "content": [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": url}}],
    }


def call(call_id: str = "call_1", name: str = "get_weather") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": '{"city": "Paris"}'}}


def tool_loop(answer_id: str = "call_1") -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call()]},
        {"role": "tool", "tool_call_id": answer_id, "content": '{"temp": 21}'},
    ]


def request(**fields: Any) -> ChatRequest:
    data: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], **fields}
    return ChatRequest.model_validate(data)


def error_fields(exc: pytest.ExceptionInfo[ValidationError]) -> list[str]:
    """The dotted locations of the errors, as intake reports them."""
    return [".".join(str(part) for part in error["loc"]) for error in exc.value.errors()]


def refused(data: dict[str, Any]) -> tuple[list[str], str]:
    with pytest.raises(ValidationError) as exc:
        ChatRequest.model_validate(data)
    return error_fields(exc), str(exc.value)


# --- valid shapes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mime_type", "data"), [("image/png", PNG), ("image/jpeg", JPEG), ("image/gif", GIF), ("image/webp", WEBP)]
)
def test_image_data_urls_of_each_type(mime_type: str, data: bytes) -> None:
    message = request(messages=[image_message(data_url(mime_type, data))]).conversation[0]
    assert isinstance(message.content, list)
    assert [type(part) for part in message.content] == [TextPart, ImagePart]
    assert message.image_bytes() == len(data)
    assert message.text_chars() == len("what is this?")


def test_https_image_with_detail() -> None:
    message = image_message("https://example.com/cat.png")
    message["content"][1]["image_url"]["detail"] = "low"
    parsed = request(messages=[message]).conversation[0]
    assert [url.url for url in parsed.image_urls()] == ["https://example.com/cat.png"]
    assert parsed.image_urls()[0].detail == "low"
    assert parsed.image_bytes() == 0


def test_a_whole_tool_loop_validates() -> None:
    parsed = request(messages=tool_loop(), tools=[WEATHER_TOOL], tool_choice="auto", parallel_tool_calls=False)
    assistant, tool = parsed.conversation[2], parsed.conversation[3]
    assert assistant.content is None
    assert assistant.tool_calls == [ToolCall.model_validate(call())]
    assert tool.tool_call_id == "call_1"
    assert parsed.tools is not None and parsed.tools[0].function.name == "get_weather"
    assert parsed.parallel_tool_calls is False


def test_tool_results_may_follow_a_call_of_an_earlier_turn() -> None:
    messages = [*tool_loop(), {"role": "assistant", "content": "21 degrees"}, {"role": "user", "content": "and now?"}]
    messages.append({"role": "tool", "tool_call_id": "call_1", "content": "22"})
    assert len(request(messages=messages).conversation) == 7


@pytest.mark.parametrize(
    "tool_choice", ["auto", "none", "required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_tool_choices(tool_choice: Any) -> None:
    assert request(tools=[WEATHER_TOOL], tool_choice=tool_choice).tool_choice is not None


def test_tool_without_parameters_and_strict_flag() -> None:
    parsed = request(tools=[{"type": "function", "function": {"name": "now", "strict": True}}])
    assert parsed.tools is not None and parsed.tools[0].function.parameters is None


def test_names_and_text_parts_in_other_roles() -> None:
    parsed = request(
        messages=[
            {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
            {"role": "user", "name": "alice_1", "content": "hi"},
            {"role": "assistant", "content": [{"type": "text", "text": "hello"}], "tool_calls": [call()]},
            {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "ok"}]},
        ]
    )
    assert [m.text_chars() for m in parsed.conversation] == [8, 2, 5 + len('{"city": "Paris"}'), 2]


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "text"},
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True}},
    ],
)
def test_response_formats(response_format: dict[str, Any]) -> None:
    parsed = request(generation_kwargs={"response_format": response_format, "n": 2})
    assert parsed.generation_kwargs.n == 2
    # The providers get the wire names back, ``schema`` included.
    assert parsed.generation_kwargs.model_dump(exclude_none=True)["response_format"] == response_format


# --- bad messages, each error naming its field -------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        (data_url("image/png", b"hello, not an image"), "not an image of type image/png"),
        (data_url("image/png", JPEG), "not an image of type image/png"),
        (data_url("image/webp", b"RIFF\x00\x00\x00\x00AVI LIST"), "not an image of type image/webp"),
        ("data:image/png;base64,iVBORw0KGgo*AAAA", "not valid base64"),
        ("data:image/png;base64,iVBORw0KGgoAAA", "not valid base64"),
        ("data:image/png;base64,", "holds no image"),
        ("data:image/svg+xml;base64," + base64.b64encode(b"<svg/>").decode(), "data:<type>;base64"),
        ("data:image/png," + "x" * 8, "data:<type>;base64"),
        ("http://example.com/cat.png", "https://"),
        ("file:///etc/passwd", "https://"),
        ("https:///no-host", "https://"),
        ("https://example.com/a cat.png", "no spaces"),
        ("https://example.com/" + "a" * MAX_IMAGE_URL_CHARS, "at most"),
    ],
)
def test_bad_image_urls_name_the_url(url: str, reason: str) -> None:
    fields, text = refused({"messages": [{"role": "user", "content": "first"}, image_message(url)]})
    assert fields == ["messages.1.content.1.image_url.url"]
    assert reason in text


def test_an_image_past_the_hard_cap_is_refused_unread() -> None:
    payload = "A" * (4 * (MAX_IMAGE_BYTES // 3 + 2))
    fields, _ = refused({"messages": [image_message("data:image/png;base64," + payload)]})
    assert fields == ["messages.0.content.1.image_url.url"]


@pytest.mark.parametrize(
    ("message", "field", "reason"),
    [
        ({"role": "tool", "content": "21"}, "messages.0.tool_call_id", "needs the tool_call_id"),
        ({"role": "user", "content": None}, "messages.0.content", "may be null only"),
        ({"role": "assistant", "content": None}, "messages.0.content", "may be null only"),
        ({"role": "user", "content": "x", "tool_calls": [call()]}, "messages.0.tool_calls", "only an assistant"),
        ({"role": "assistant", "content": "x", "tool_calls": []}, "messages.0.tool_calls", "at least 1"),
        ({"role": "user", "content": "x", "tool_call_id": "call_1"}, "messages.0.tool_call_id", "only a tool"),
        ({"role": "user", "content": []}, "messages.0.content", "at least 1"),
        ({"role": "user", "content": 5}, "messages.0.content", "a string, a list of parts or null"),
        ({"role": "user", "content": [{"type": "video", "url": "x"}]}, "messages.0.content.0", "does not match"),
        ({"role": "user", "content": [{"type": "text"}]}, "messages.0.content.0.text", "required"),
        (
            {"role": "user", "content": [{"type": "text", "text": "x", "more": 1}]},
            "messages.0.content.0.more",
            "not permitted",
        ),
        (
            {"role": "system", "content": [{"type": "image_url", "image_url": {"url": "https://e.com/a.png"}}]},
            "messages.0.content.0",
            "may not hold images",
        ),
        (
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "function": {"name": "f"}}]},
            "messages.0.tool_calls.0.function.arguments",
            "required",
        ),
        (
            {"role": "assistant", "content": None, "tool_calls": [{**call(), "type": "code"}]},
            "messages.0.tool_calls.0.type",
            "function",
        ),
        ({"role": "user", "content": "x", "name": "no spaces allowed"}, "messages.0.name", "pattern"),
    ],
)
def test_bad_messages_name_the_field(message: dict[str, Any], field: str, reason: str) -> None:
    fields, text = refused({"messages": [message]})
    assert fields == [field]
    assert reason in text


def test_too_many_parts() -> None:
    fields, _ = refused(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}] * (MAX_CONTENT_PARTS + 1)}]}
    )
    assert fields == ["messages.0.content"]


@pytest.mark.parametrize("answer_id", ["call_2", "CALL_1"])
def test_a_tool_message_must_answer_an_earlier_call(answer_id: str) -> None:
    fields, text = refused({"messages": tool_loop(answer_id)})
    assert fields == ["messages.3.tool_call_id"]
    assert f"{answer_id!r} answers no tool call" in text


def test_a_tool_message_may_not_answer_a_later_call() -> None:
    messages = tool_loop()
    messages[2], messages[3] = messages[3], messages[2]
    fields, _ = refused({"messages": messages})
    assert fields == ["messages.2.tool_call_id"]


def test_intake_reports_the_field(make_settings: SettingsFactory) -> None:
    settings = make_settings({"steady": {"text": "hello"}}, {"default": ["steady"]})
    intake = read_request({"request_id": "r-1", "messages": tool_loop("call_9")}, None, settings)
    assert intake.error is not None
    assert "messages.3.tool_call_id:" in str(intake.error)


def test_intake_counts_text_of_parts_and_tool_calls(make_settings: SettingsFactory) -> None:
    settings = make_settings({"steady": {"text": "hello"}}, {"default": ["steady"]}, max_input_chars=20)
    parts = [{"role": "user", "content": [{"type": "text", "text": "x" * 21}]}]
    assert "exceed the limit of 20" in str(read_request({"request_id": "r-1", "messages": parts}, None, settings).error)
    loop = tool_loop()[1:]  # 17 characters of question, 17 of arguments, 12 of result
    assert "46 characters" in str(read_request({"request_id": "r-1", "messages": loop}, None, settings).error)


# --- bad tools, tool_choice, response_format and n ----------------------------------------


def tool(**function: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": "f", **function}}


@pytest.mark.parametrize(
    ("tools", "field", "reason"),
    [
        ([tool(name="has space")], "tools.0.function.name", "pattern"),
        ([tool(name="x" * 65)], "tools.0.function.name", "pattern"),
        ([tool(name="")], "tools.0.function.name", "pattern"),
        ([{"function": {"description": "no name"}}], "tools.0.function.name", "required"),
        ([{"type": "retrieval", "function": {"name": "f"}}], "tools.0.type", "function"),
        ([tool(parameters={"type": "strin"})], "tools.0.function.parameters", "not a valid JSON Schema"),
        (
            [tool(parameters={"type": "object", "properties": {"a": {"minLength": -1}}})],
            "tools.0.function.parameters",
            "$.properties.a.minLength",
        ),
        ([tool(parameters={"required": "city"})], "tools.0.function.parameters", "not a valid JSON Schema"),
        ([tool(parameters="object")], "tools.0.function.parameters", "dictionary"),
        ([tool(unknown=1)], "tools.0.function.unknown", "not permitted"),
        ([tool(), WEATHER_TOOL, tool()], "tools.2.function.name", "duplicate tool name 'f'"),
    ],
)
def test_malformed_tools_name_the_field(tools: list[Any], field: str, reason: str) -> None:
    fields, text = refused({"prompt": "hi", "tools": tools})
    assert fields == [field]
    assert reason in text


@pytest.mark.parametrize(
    ("tools", "tool_choice", "field", "reason"),
    [
        (
            [WEATHER_TOOL],
            {"type": "function", "function": {"name": "get_time"}},
            "tool_choice.function.name",
            "'get_time', which is not in tools",
        ),
        (None, {"type": "function", "function": {"name": "get_weather"}}, "tool_choice.function.name", "not in tools"),
        (None, "required", "tool_choice", "needs tools"),
    ],
)
def test_tool_choice_must_name_a_defined_tool(tools: Any, tool_choice: Any, field: str, reason: str) -> None:
    fields, text = refused({"prompt": "hi", "tools": tools, "tool_choice": tool_choice})
    assert fields == [field]
    assert reason in text


def test_an_unknown_tool_choice_is_refused() -> None:
    fields, _ = refused({"prompt": "hi", "tools": [WEATHER_TOOL], "tool_choice": "sometimes"})
    assert fields and all(field.startswith("tool_choice") for field in fields)


@pytest.mark.parametrize(
    ("response_format", "field", "reason"),
    [
        ({"type": "json_schema"}, "generation_kwargs.response_format.json_schema", "needs json_schema"),
        (
            {"type": "json_object", "json_schema": {"name": "a", "schema": {}}},
            "generation_kwargs.response_format.json_schema",
            "takes no",
        ),
        ({"type": "yaml"}, "generation_kwargs.response_format.type", "json_schema"),
        (
            {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": 5}}},
            "generation_kwargs.response_format.json_schema.schema",
            "not a valid JSON Schema",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}},
            "generation_kwargs.response_format.json_schema.name",
            "pattern",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "a"}},
            "generation_kwargs.response_format.json_schema.schema",
            "required",
        ),
    ],
)
def test_bad_response_formats_name_the_field(response_format: dict[str, Any], field: str, reason: str) -> None:
    fields, text = refused({"prompt": "hi", "generation_kwargs": {"response_format": response_format}})
    assert fields == [field]
    assert reason in text


@pytest.mark.parametrize("n", [0, -1, MAX_CHOICES + 1])
def test_n_out_of_range(n: int) -> None:
    fields, _ = refused({"prompt": "hi", "generation_kwargs": {"n": n}})
    assert fields == ["generation_kwargs.n"]


# --- replies go back into the next request ------------------------------------------------


def test_a_tool_calling_reply_round_trips_into_the_next_request() -> None:
    reply = AssistantReply.model_validate(
        {"content": None, "tool_calls": [call()], "meta": {"model": "m", "finish_reason": "tool_calls"}}
    )
    first = tool_loop()[:2]
    # Python: the helper; plain JSON: the reply's object minus meta, as stored.
    as_message = reply.to_message()
    as_json = reply.model_dump(mode="json", exclude={"meta"})
    for appended in (as_message.model_dump(mode="json"), as_json):
        follow_up = request(
            messages=[*first, appended, {"role": "tool", "tool_call_id": "call_1", "content": "21"}],
            tools=[WEATHER_TOOL],
        )
        assert follow_up.conversation[2] == as_message
    assert as_message == ChatMessage(role="assistant", content=None, tool_calls=reply.tool_calls)


def test_a_text_reply_round_trips_into_the_next_request() -> None:
    reply = AssistantReply(content="21 degrees", meta=ReplyMeta(model="m"))
    follow_up = request(messages=[{"role": "user", "content": "hi"}, reply.model_dump(mode="json", exclude={"meta"})])
    assert follow_up.conversation[1] == reply.to_message() == ChatMessage(role="assistant", content="21 degrees")


def test_an_empty_reply_still_makes_a_valid_message() -> None:
    reply = AssistantReply(content=None, tool_calls=[], meta=ReplyMeta(model="m"))
    assert (reply.content, reply.tool_calls) == ("", None)
    assert reply.to_message() == ChatMessage(role="assistant", content="")


def test_a_v2_request_survives_the_hand_off_encoding() -> None:
    # A worker passes the request on as JSON without its nulls (tasks/chat.py): an assistant
    # message's null content is left out and must still read back the same.
    parsed = request(
        messages=[image_message(data_url("image/png", PNG)), *tool_loop()[2:]],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        generation_kwargs={"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {}}}},
    )
    encoded = parsed.model_dump(mode="json", exclude_none=True)
    assert "content" not in encoded["messages"][1]
    assert ChatRequest.model_validate(encoded) == parsed
