"""Messages v2 on Chat Completions (``openai`` and ``azure_openai``) at the wire level: tools,
tool choice and parallel calls on the wire, tool calls streamed in fragments across several
events, tool results and image parts going back, ``n`` = 2 interleaved, ``response_format``,
and in the chain: an invalid JSON answer falling back, a provider without tools skipped."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import pytest

from providers import errors
from providers.base import ChatProvider, ProviderCall
from providers.chain import ChainRun
from providers.openai.azure import AzureOpenAIChatProvider
from providers.openai.chat import OpenAIChatProvider
from settings.providers import AzureOpenAIConfig, OpenAIConfig
from tasks.contract.schemas import ChatMessage, NamedToolChoice, ToolCallDelta, ToolDefinition
from tests.fakes.http import FakeHTTPServer, Reply
from tests.providers.openai_wire import (
    aim_openai_at,
    chat_chunk,
    chat_completion,
    chat_completion_calling,
    chat_stream,
    tool_call_stream,
    usage_chunk,
)
from tests.support.calls import ChainRecorder, ChunkCollector, make_call, provider_factory

ProviderFactory = Callable[..., ChatProvider]

TOOLS = [
    ToolDefinition.model_validate(
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
                "strict": True,
            },
        }
    ),
    ToolDefinition.model_validate({"type": "function", "function": {"name": "get_time"}}),
]
PNG = (
    "data:image/png;base64,"
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAfbLI3wAAAABJRU5ErkJggg=="
)
WEATHER_CHOICE = NamedToolChoice.model_validate({"type": "function", "function": {"name": "get_weather"}})
CITY_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "city",
        "schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        "strict": True,
    },
}


@pytest.fixture
def make_provider(server: FakeHTTPServer, monkeypatch: pytest.MonkeyPatch) -> ProviderFactory:
    aim_openai_at(server, monkeypatch)
    return provider_factory("primary", OpenAIConfig, OpenAIChatProvider, model="gpt-4.1-mini", max_retries=0)


@pytest.fixture
def make_azure(server: FakeHTTPServer, monkeypatch: pytest.MonkeyPatch) -> ProviderFactory:
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "0123456789abcdef")
    monkeypatch.delenv("AZURE_OPENAI_AD_TOKEN", raising=False)
    monkeypatch.delenv("OPENAI_API_VERSION", raising=False)
    return provider_factory(
        "azure",
        AzureOpenAIConfig,
        AzureOpenAIChatProvider,
        azure_endpoint=f"{server.url}/",
        azure_deployment="gpt-41-mini-prod",
        max_retries=0,
    )


def call_with(*, stream: bool = True, messages: list[ChatMessage] | None = None, **fields: Any) -> ProviderCall:
    """A call of the short conversation (or ``messages``) with the v2 ``fields`` set."""
    call = make_call(stream=stream) if messages is None else make_call(stream=stream, messages=messages)
    return dataclasses.replace(call, **fields)


def conversation_with_results() -> list[ChatMessage]:
    """A user turn with an image, the assistant's two calls, and both results."""
    return [
        ChatMessage.model_validate(
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather where this photo was taken?"},
                    {"type": "image_url", "image_url": {"url": PNG, "detail": "low"}},
                ],
            }
        ),
        ChatMessage.model_validate(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    },
                    {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
                ],
            }
        ),
        ChatMessage(role="tool", tool_call_id="call_1", content='{"temp_c": 21}'),
        ChatMessage(role="tool", tool_call_id="call_2", content="14:05"),
    ]


@pytest.mark.parametrize("kind", ["openai", "azure"])
def test_parallel_tool_calls_stream_in_fragments(
    kind: str, server: FakeHTTPServer, make_provider: ProviderFactory, make_azure: ProviderFactory
) -> None:
    events: list[Any] = [
        *tool_call_stream(
            ("call_1", "get_weather", ['{"ci', 'ty": "Pa', 'ris"}']),
            ("call_2", "get_time", ["{", "}"]),
        ),
        usage_chunk(40, 18),
        "[DONE]",
    ]
    if kind == "azure":  # Azure opens with a prompt-filter chunk: no choices, no model
        events.insert(0, {**chat_chunk(model=""), "choices": [], "prompt_filter_results": []})
    server.queue(Reply(events=events, event_delay_s=0.001))
    collect = ChunkCollector()
    provider = (make_provider if kind == "openai" else make_azure)()

    (reply,) = provider.run(call_with(tools=TOOLS, tool_choice=WEATHER_CHOICE, parallel_tool_calls=True), collect)

    deltas = [chunk.tool_call for chunk in collect.chunks]
    assert collect.text == "" and all(chunk.index == 0 for chunk in collect.chunks)
    assert deltas == [
        ToolCallDelta(index=0, id="call_1", name="get_weather", arguments_delta=""),
        ToolCallDelta(index=0, arguments_delta='{"ci'),
        ToolCallDelta(index=0, arguments_delta='ty": "Pa'),
        ToolCallDelta(index=0, arguments_delta='ris"}'),
        ToolCallDelta(index=1, id="call_2", name="get_time", arguments_delta=""),
        ToolCallDelta(index=1, arguments_delta="{"),
        ToolCallDelta(index=1, arguments_delta="}"),
    ]
    assert reply.content is None and reply.meta.finish_reason == "tool_calls"
    assert reply.tool_calls is not None
    assert [(c.id, c.function.name, c.function.arguments) for c in reply.tool_calls] == [
        ("call_1", "get_weather", '{"city": "Paris"}'),
        ("call_2", "get_time", "{}"),
    ]
    assert (reply.meta.usage.prompt_tokens, reply.meta.usage.completion_tokens) == (40, 18)
    body = server.received[0].body
    assert body["tools"] == [tool.model_dump(mode="json", exclude_none=True) for tool in TOOLS]
    assert body["tools"][0]["function"]["strict"] is True
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["parallel_tool_calls"] is True


def test_tool_results_and_image_parts_go_back_in_openai_shape(
    server: FakeHTTPServer, make_provider: ProviderFactory
) -> None:
    server.queue(Reply(events=chat_stream("It is 21 C in Paris", " at 14:05.")))
    messages = conversation_with_results()

    (reply,) = make_provider().run(call_with(messages=messages, tools=TOOLS), ChunkCollector())

    assert reply.content == "It is 21 C in Paris at 14:05." and reply.tool_calls is None
    sent = server.received[0].body["messages"]
    assert sent == [message.model_dump(mode="json", exclude_none=True) for message in messages]
    assert sent[0]["content"][1] == {"type": "image_url", "image_url": {"url": PNG, "detail": "low"}}
    assert sent[1]["tool_calls"][0]["function"]["arguments"] == '{"city":"Paris"}'
    assert sent[2] == {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'}
    assert "parallel_tool_calls" not in server.received[0].body  # the request left it to the API


def test_two_choices_interleaved_one_calling_a_tool(server: FakeHTTPServer, make_provider: ProviderFactory) -> None:
    calling = tool_call_stream(("call_9", "get_weather", ['{"city"', ': "Lyon"}']), index=1)
    events = [
        chat_chunk("", role="assistant", index=0),
        calling[0],
        chat_chunk("Par", index=0),
        calling[1],
        chat_chunk("is", index=0, finish_reason="stop"),
        calling[2],
        calling[3],
        usage_chunk(30, 9),
        "[DONE]",
    ]
    server.queue(Reply(events=events))
    collect = ChunkCollector()

    replies = make_provider().run(call_with(tools=TOOLS, n=2), collect)

    assert [(chunk.index, chunk.content or chunk.tool_call) for chunk in collect.chunks] == [
        (1, ToolCallDelta(index=0, id="call_9", name="get_weather")),
        (0, "Par"),
        (1, ToolCallDelta(index=0, arguments_delta='{"city"')),
        (0, "is"),
        (1, ToolCallDelta(index=0, arguments_delta=': "Lyon"}')),
    ]
    first, second = replies
    assert (first.meta.index, first.content, first.tool_calls, first.meta.finish_reason) == (0, "Paris", None, "stop")
    assert second.meta.index == 1 and second.content is None and second.meta.finish_reason == "tool_calls"
    assert second.tool_calls is not None and second.tool_calls[0].function.arguments == '{"city": "Lyon"}'
    assert server.received[0].body["n"] == 2


def test_non_streamed_tool_calls(server: FakeHTTPServer, make_provider: ProviderFactory) -> None:
    completion = chat_completion_calling(("call_a", "get_weather", '{"city": "Oslo"}'), ("call_b", "get_time", "{}"))
    server.queue(Reply(json_body=completion))
    collect = ChunkCollector()

    (reply,) = make_provider().run(call_with(stream=False, tools=TOOLS, tool_choice="required"), collect)

    assert reply.tool_calls is not None
    assert [(c.id, c.function.name, c.function.arguments) for c in reply.tool_calls] == [
        ("call_a", "get_weather", '{"city": "Oslo"}'),
        ("call_b", "get_time", "{}"),
    ]
    assert reply.meta.finish_reason == "tool_calls"
    assert [chunk.tool_call.name for chunk in collect.chunks if chunk.tool_call] == ["get_weather", "get_time"]
    assert server.received[0].body["tool_choice"] == "required"


def test_response_format_goes_on_the_wire(server: FakeHTTPServer, make_provider: ProviderFactory) -> None:
    server.queue(Reply(json_body=chat_completion('{"city": "Paris"}')))
    call = make_call(stream=False, response_format=CITY_FORMAT)

    (reply,) = make_provider().run(call, ChunkCollector())

    assert reply.content == '{"city": "Paris"}'
    assert server.received[0].body["response_format"] == CITY_FORMAT


def chain(providers: list[ChatProvider], listener: ChainRecorder, **fields: Any) -> ChainRun:
    return ChainRun(
        providers=providers,
        messages=[ChatMessage(role="user", content="Capital of France, as JSON?")],
        deadline=time.monotonic() + 10,
        listener=listener,
        **{"generation_kwargs": {}, **fields},
    )


def test_an_invalid_json_answer_falls_back_to_the_next_provider(
    server: FakeHTTPServer, make_provider: ProviderFactory
) -> None:
    server.queue(
        Reply(events=chat_stream('{"town": ', '"Paris"}')),  # JSON, but not valid against the schema
        Reply(events=chat_stream('{"city": ', '"Paris"}')),
    )
    listener = ChainRecorder()
    run = chain(
        [make_provider(max_retries=2), make_provider()], listener, generation_kwargs={"response_format": CITY_FORMAT}
    )

    outcome = run.execute()

    assert outcome.succeeded_index == 1 and outcome.replies[0].content == '{"city": "Paris"}'
    assert [(r.outcome, r.error_type, r.chunks) for r in run.attempts] == [
        ("failed", "invalid_output", 2),
        ("succeeded", None, 2),
    ]
    assert [record.attempt for record in listener.failed] == [1]
    assert len(server.received) == 2  # no retry of the provider that answered badly
    assert all(request.body["response_format"] == CITY_FORMAT for request in server.received)


def test_a_provider_without_tools_is_skipped_without_a_request(
    server: FakeHTTPServer, make_provider: ProviderFactory
) -> None:
    server.queue(Reply(events=[*tool_call_stream(("call_1", "get_time", ["{}"])), "[DONE]"]))
    run = chain([make_provider(supports_tools=False), make_provider()], ChainRecorder(), tools=TOOLS)

    outcome = run.execute()

    assert outcome.succeeded_index == 1
    assert [(r.outcome, r.error_type) for r in run.attempts] == [("skipped", "unsupported"), ("succeeded", None)]
    assert len(server.received) == 1
    assert outcome.replies[0].tool_calls is not None


def test_a_stream_that_ends_before_every_choice_finished_is_cut(
    server: FakeHTTPServer, make_provider: ProviderFactory
) -> None:
    events = [
        chat_chunk("Par", index=0),
        tool_call_stream(("call_1", "get_time", ["{"]), index=1)[0],
        chat_chunk("is", index=0, finish_reason="stop"),
        "[DONE]",  # choice 1 never finished
    ]
    server.queue(Reply(events=events))
    collect = ChunkCollector()

    with pytest.raises(errors.StreamInterrupted):
        make_provider().run(call_with(tools=TOOLS, n=2), collect)

    assert [chunk.index for chunk in collect.chunks] == [0, 1, 0]
