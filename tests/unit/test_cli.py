"""The ``cascade`` command's request building and printing (tasks.producer.cli): tools, tool
choice, images, response formats and choices on the way in; tool-call fragments, choices and
tool calls on the way out."""

from __future__ import annotations

import io
import json
from pathlib import Path

from tasks.contract.schemas import (
    AssistantReply,
    ChatReply,
    ChatRequest,
    FunctionCall,
    ReplyMeta,
    StreamEvent,
    ToolCall,
)
from tasks.producer.cli import build_parser, describe_reply, print_stream, request_fields

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def fields_of(*argv: str) -> dict[str, object]:
    return request_fields(build_parser().parse_args(["submit", *argv]))


def test_submit_takes_tools_a_tool_choice_images_a_format_and_choices(tmp_path: Path) -> None:
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    image = tmp_path / "cat.png"
    image.write_bytes(PNG)
    fields = fields_of(
        "--prompt", "Weather?", "--system", "Be brief.", "--image", str(image), "--tools", f"@{tools}",
        "--tool-choice", "get_weather", "--response-format", "json_object", "-n", "2",
    )  # fmt: skip
    request = ChatRequest.model_validate(fields)
    assert request.tools is not None and request.tools[0].function.name == "get_weather"
    assert request.tool_choice is not None and not isinstance(request.tool_choice, str)
    assert request.generation_kwargs.n == 2
    assert request.generation_kwargs.response_format is not None
    assert [m.role for m in request.conversation] == ["system", "user"]
    assert len(request.conversation[1].image_urls()) == 1


def test_submit_without_images_keeps_the_prompt_shorthand() -> None:
    fields = fields_of("--prompt", "Hi", "--tool-choice", "auto")
    assert fields["prompt"] == "Hi" and fields["tool_choice"] == "auto" and "messages" not in fields


def event(seq: int, **fields: object) -> StreamEvent:
    return StreamEvent.model_validate({"v": 1, "request_id": "r", "seq": seq, **fields})


def test_the_stream_prints_tool_call_fragments_and_marks_choices() -> None:
    events = [
        event(0, type="start", chain="default"),
        event(1, type="chunk", delta="Let me check. ", provider="p", attempt=1, index=0),
        event(2, type="chunk", provider="p", attempt=1, index=0,
              tool_call={"index": 0, "id": "call_1", "name": "get_weather", "arguments_delta": '{"city": '}),
        event(3, type="chunk", provider="p", attempt=1, index=0, tool_call={"index": 0, "arguments_delta": '"Paris"}'}),
        event(4, type="chunk", delta="Other choice", provider="p", attempt=1, index=1),
    ]  # fmt: skip
    out = io.StringIO()
    print_stream(events, out)
    text = out.getvalue()
    assert 'Let me check. \n[tool call 0: get_weather call_1] {"city": "Paris"}' in text
    assert "\n[choice 1] Other choice" in text


def test_the_summary_lists_tool_calls_per_choice() -> None:
    call = ToolCall(id="call_1", function=FunctionCall(name="get_weather", arguments='{"city": "Paris"}'))
    reply = ChatReply(
        request_id="r",
        status="succeeded",
        replies=[
            AssistantReply(content=None, tool_calls=[call], meta=ReplyMeta(model="m", finish_reason="tool_calls"))
        ],
    )
    summary = describe_reply(reply)
    assert "choice 0: model m, finish: tool_calls" in summary
    assert 'tool call call_1: get_weather({"city": "Paris"})' in summary


def test_submit_asks_for_a_hallucination_score() -> None:
    assert fields_of("--prompt", "Hi", "--hallucination-score", "defaults")["hallucination_score"] == {}
    fields = fields_of("--prompt", "Hi", "--hallucination-score", '{"n_samples": 3, "m": 2}')
    request = ChatRequest.model_validate(fields)
    assert request.hallucination_score is not None and request.hallucination_score.n_samples == 3
