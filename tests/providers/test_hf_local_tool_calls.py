"""Reading a local model's tool calls (``providers.huggingface.tool_calls``) from scripted text
streams: each stream goes, piece by piece, through ``GeneratedReply`` with the splitter the
provider would pick, which is the code path of the provider's own generation loop."""

from __future__ import annotations

import json
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("transformers")

from providers.huggingface.tool_calls import (
    TOOL_CALL_FORMATS,
    GeneratedReply,
    ParsedCall,
    PassThrough,
    Splitter,
    calls_from_text,
    detect_format,
    template_messages,
    template_takes_tools,
)
from tasks.contract.schemas import AssistantReply, ChatMessage, Usage
from tests.support.calls import ChunkCollector
from tests.support.tiny_model import CHAT_TEMPLATE, TOOLS_CHAT_TEMPLATE

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
NO_TOKENIZER = SimpleNamespace(chat_template=None, response_template=None)
# A tokenizer's own response_template, in the shape transformers' serve uses for Qwen.
QWEN_RESPONSE_TEMPLATE: dict[str, Any] = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|im_start|>assistant\n",
    "fields": {
        "tool_calls": {
            "open_pattern": r"\s*<tool_call>",
            "close": "</tool_call>",
            "repeats": True,
            "content": "json",
            "transform": {"type": "function", "function": "{content}"},
        },
        "content": {"close_pattern": r"\s*<\|im_end\|>", "content": "text"},
    },
}


def pieces_of(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def stream(splitter: Splitter, pieces: Sequence[str]) -> tuple[ChunkCollector, AssistantReply]:
    collect = ChunkCollector()
    reply = GeneratedReply(collect, "tiny", splitter)
    for piece in pieces:
        reply.feed(piece)
    reply.close()
    [answer] = reply.replies("stop", Usage(prompt_tokens=3, completion_tokens=5, total_tokens=8))
    return collect, answer


def hermes() -> Splitter:
    return TOOL_CALL_FORMATS["hermes"](NO_TOKENIZER, "")


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_hermes_text_streams_and_a_block_becomes_one_call_fragment(size: int) -> None:
    text = f"Let me check.<tool_call>\n{WEATHER}\n</tool_call>"

    collect, reply = stream(hermes(), pieces_of(text, size))

    texts = [chunk.content for chunk in collect.chunks if chunk.tool_call is None]
    assert "".join(texts) == "Let me check."
    assert not any("<tool" in piece or "get_weather" in piece for piece in texts)
    [fragment] = [chunk.tool_call for chunk in collect.chunks if chunk.tool_call is not None]
    assert fragment.index == 0 and fragment.name == "get_weather" and fragment.id
    assert json.loads(fragment.arguments_delta) == {"city": "Paris"}
    assert collect.chunks[-1].tool_call is fragment, "the call goes out after the text before it"
    assert reply.content == "Let me check."
    assert reply.tool_calls is not None and [call.function.name for call in reply.tool_calls] == ["get_weather"]
    assert reply.tool_calls[0].id == fragment.id
    assert reply.meta.finish_reason == "tool_calls"


def test_hermes_reads_several_calls_in_order_with_their_own_indexes() -> None:
    text = f'<tool_call>{WEATHER}</tool_call>\n<tool_call>{{"name": "get_time", "arguments": {{}}}}</tool_call>'

    collect, reply = stream(hermes(), pieces_of(text, 4))

    fragments = [chunk.tool_call for chunk in collect.chunks if chunk.tool_call is not None]
    assert [(f.index, f.name, f.arguments_delta) for f in fragments] == [
        (0, "get_weather", '{"city": "Paris"}'),
        (1, "get_time", "{}"),
    ]
    assert len({f.id for f in fragments}) == 2
    assert reply.content is None and reply.tool_calls is not None and len(reply.tool_calls) == 2


def test_hermes_text_that_only_looks_like_a_delimiter_streams_as_text() -> None:
    collect, reply = stream(hermes(), ["a <tool", "s> list", " of <tool_c", "hairs>"])

    assert collect.text == reply.content == "a <tools> list of <tool_chairs>"
    assert reply.tool_calls is None and reply.meta.finish_reason == "stop"


def test_hermes_a_block_that_is_not_a_call_comes_back_as_text() -> None:
    collect, reply = stream(hermes(), pieces_of("Hi<tool_call>not json</tool_call> there", 5))

    assert reply.tool_calls is None
    assert reply.content == collect.text == "Hi<tool_call>not json</tool_call> there"


def test_hermes_a_block_cut_by_the_end_of_generation_is_read_as_it_stands() -> None:
    _, complete = stream(hermes(), [f"<tool_call>{WEATHER}"])
    assert complete.tool_calls is not None and complete.tool_calls[0].function.name == "get_weather"

    _, cut = stream(hermes(), ['<tool_call>{"name": "get_wea'])
    assert cut.tool_calls is None and cut.content == '<tool_call>{"name": "get_wea</tool_call>'


def test_json_a_bare_call_or_a_list_of_calls_is_read_whole() -> None:
    _, one = stream(TOOL_CALL_FORMATS["json"](NO_TOKENIZER, ""), pieces_of("  " + WEATHER, 3))
    assert one.tool_calls is not None and [c.function.name for c in one.tool_calls] == ["get_weather"]
    assert one.content is None and one.meta.finish_reason == "tool_calls"

    llama = '[{"name": "get_time", "parameters": {"zone": "UTC"}}, {"name": "get_weather", "arguments": "{}"}]'
    _, two = stream(TOOL_CALL_FORMATS["json"](NO_TOKENIZER, ""), pieces_of(llama, 5))
    assert two.tool_calls is not None
    assert [(c.function.name, c.function.arguments) for c in two.tool_calls] == [
        ("get_time", '{"zone": "UTC"}'),
        ("get_weather", "{}"),
    ]


def test_json_prose_streams_at_once_and_json_that_is_no_call_comes_back_as_text() -> None:
    splitter = TOOL_CALL_FORMATS["json"](NO_TOKENIZER, "")
    assert splitter.feed(" ") == [] and splitter.feed("Paris") == [" Paris"] and splitter.feed(" {x}") == [" {x}"]

    collect, reply = stream(TOOL_CALL_FORMATS["json"](NO_TOKENIZER, ""), ['{"city": ', '"Paris"}'])
    assert reply.tool_calls is None and reply.content == collect.text == '{"city": "Paris"}'


def test_template_format_reads_the_tokenizers_own_response_template() -> None:
    tokenizer = SimpleNamespace(chat_template=TOOLS_CHAT_TEMPLATE, response_template=QWEN_RESPONSE_TEMPLATE)
    assert detect_format(tokenizer, None) == "template"
    prompt = "<|im_start|>user\nWeather?<|im_end|>\n<|im_start|>assistant\n"
    splitter = TOOL_CALL_FORMATS["template"](tokenizer, prompt)

    collect, reply = stream(splitter, pieces_of(f"Checking.\n<tool_call>\n{WEATHER}\n</tool_call>", 2))

    assert collect.text == reply.content == "Checking."
    assert reply.tool_calls is not None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in reply.tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ]


def test_template_format_gives_a_block_its_parser_refuses_back_as_text() -> None:
    tokenizer = SimpleNamespace(response_template=QWEN_RESPONSE_TEMPLATE)
    splitter = TOOL_CALL_FORMATS["template"](tokenizer, "")

    collect, reply = stream(splitter, ["Hi", "<tool_call>{oops", "}</tool_call> rest"])

    assert reply.tool_calls is None
    assert "{oops}" in collect.text and collect.text.endswith(" rest")


def test_without_tools_everything_is_text() -> None:
    text = f"<tool_call>{WEATHER}</tool_call>"
    collect, reply = stream(PassThrough(), pieces_of(text, 4))
    assert reply.content == collect.text == text and reply.tool_calls is None


def test_the_format_is_detected_from_the_template() -> None:
    assert detect_format(SimpleNamespace(chat_template=TOOLS_CHAT_TEMPLATE), None) == "hermes"
    assert detect_format(SimpleNamespace(chat_template=CHAT_TEMPLATE), None) == "json"
    assert detect_format(SimpleNamespace(chat_template=CHAT_TEMPLATE), TOOLS_CHAT_TEMPLATE) == "hermes"
    assert template_takes_tools(TOOLS_CHAT_TEMPLATE) and not template_takes_tools(CHAT_TEMPLATE)


def test_calls_from_text_reads_openai_shaped_and_refuses_what_is_no_call() -> None:
    openai_shaped = '{"type": "function", "function": {"name": "f", "arguments": {"a": 1}}}'
    assert calls_from_text(openai_shaped) == [ParsedCall("f", '{"a": 1}')]
    for not_a_call in ('{"city": "Paris"}', "[]", '[{"name": "f"}, 3]', '{"name": ""}', "{"):
        assert calls_from_text(not_a_call) is None, not_a_call


def test_messages_reach_the_template_as_templates_read_them() -> None:
    messages = [
        ChatMessage.model_validate(
            {"role": "user", "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "in Paris?"}]}
        ),
        ChatMessage.model_validate(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    },
                    {"id": "call_2", "type": "function", "function": {"name": "echo", "arguments": "not json"}},
                ],
            }
        ),
        ChatMessage(role="tool", tool_call_id="call_1", content="18 C"),
    ]

    user, assistant, tool = template_messages(messages)

    assert user["content"] == "Weather in Paris?"
    assert assistant["content"] == ""
    assert assistant["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert assistant["tool_calls"][1]["function"]["arguments"] == "not json"
    assert tool == {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}
