"""Messages v2 on the Responses API (``openai_responses`` and ``azure_openai_responses``) at the
wire level: function tools as its items, input items from messages (content parts, function
calls and their outputs under ``call_id``), streamed ``response.function_call_arguments.delta``
fragments, ``text.format`` for a JSON schema, and in the chain: an invalid JSON answer falling
back, ``n`` > 1 skipped."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import pytest

from providers import errors
from providers.base import ChatProvider, ProviderCall
from providers.chain import ChainRun
from providers.openai.azure import AzureOpenAIResponsesProvider
from providers.openai.chat import OpenAIChatProvider
from providers.openai.responses import OpenAIResponsesProvider
from settings.providers import AzureOpenAIResponsesConfig, OpenAIConfig, OpenAIResponsesConfig
from tasks.contract.schemas import ChatMessage, NamedToolChoice, ToolCallDelta, ToolDefinition
from tests.fakes.http import FakeHTTPServer, Reply
from tests.providers.openai_wire import (
    aim_openai_at,
    chat_chunk,
    function_call_events,
    lifecycle,
    response_object,
    responses_answer,
    responses_stream,
    summary_delta,
    usage_chunk,
)
from tests.support.calls import ChainRecorder, ChunkCollector, make_call, provider_factory, run_failing

ProviderFactory = Callable[..., ChatProvider]
STARTED = response_object(status="in_progress", usage=None)
TOOLS = [
    ToolDefinition.model_validate(
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ),
    ToolDefinition.model_validate({"type": "function", "function": {"name": "get_time", "strict": True}}),
]
PNG = (
    "data:image/png;base64,"
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAfbLI3wAAAABJRU5ErkJggg=="
)
CITY_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "city",
        "schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture
def make_provider(server: FakeHTTPServer, monkeypatch: pytest.MonkeyPatch) -> ProviderFactory:
    aim_openai_at(server, monkeypatch)
    return provider_factory("thinker", OpenAIResponsesConfig, OpenAIResponsesProvider, model="o4-mini", max_retries=0)


@pytest.fixture
def make_azure(server: FakeHTTPServer, monkeypatch: pytest.MonkeyPatch) -> ProviderFactory:
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "0123456789abcdef")
    monkeypatch.delenv("AZURE_OPENAI_AD_TOKEN", raising=False)
    monkeypatch.delenv("OPENAI_API_VERSION", raising=False)
    return provider_factory(
        "azure_thinker",
        AzureOpenAIResponsesConfig,
        AzureOpenAIResponsesProvider,
        azure_endpoint=server.url,
        azure_deployment="o4-mini-prod",
        max_retries=0,
    )


def call_with(*, stream: bool = True, messages: list[ChatMessage] | None = None, **fields: Any) -> ProviderCall:
    call = make_call(stream=stream) if messages is None else make_call(stream=stream, messages=messages)
    return dataclasses.replace(call, **fields)


@pytest.mark.parametrize("kind", ["openai", "azure"])
def test_parallel_function_calls_stream_in_fragments(
    kind: str, server: FakeHTTPServer, make_provider: ProviderFactory, make_azure: ProviderFactory
) -> None:
    calls = [("call_W", "get_weather", '{"city": "Paris"}'), ("call_T", "get_time", "{}")]
    final = response_object(reasoning=["Two lookups."], function_calls=calls, usage=(50, 22))
    server.queue(
        responses_stream(
            lifecycle("response.created", STARTED),
            summary_delta("Two lookups."),
            *function_call_events(
                "call_W", "get_weather", ['{"ci', 'ty": "Pa', 'ris"}'], output_index=1, item_id="fc_0"
            ),
            *function_call_events("call_T", "get_time", ["{", "}"], output_index=2, item_id="fc_1"),
            lifecycle("response.completed", final),
        )
    )
    collect = ChunkCollector()
    provider = (make_provider if kind == "openai" else make_azure)()
    choice = NamedToolChoice.model_validate({"type": "function", "function": {"name": "get_time"}})

    (reply,) = provider.run(call_with(tools=TOOLS, tool_choice=choice, parallel_tool_calls=True), collect)

    assert collect.text == ""
    assert [chunk.tool_call for chunk in collect.chunks] == [
        ToolCallDelta(index=0, id="call_W", name="get_weather"),
        ToolCallDelta(index=0, arguments_delta='{"ci'),
        ToolCallDelta(index=0, arguments_delta='ty": "Pa'),
        ToolCallDelta(index=0, arguments_delta='ris"}'),
        ToolCallDelta(index=1, id="call_T", name="get_time"),
        ToolCallDelta(index=1, arguments_delta="{"),
        ToolCallDelta(index=1, arguments_delta="}"),
    ]
    # The ids are the call_ids a function_call_output answers, not the items' ids.
    assert reply.tool_calls is not None
    assert [(c.id, c.function.name, c.function.arguments) for c in reply.tool_calls] == calls
    assert reply.content is None and reply.meta.finish_reason == "tool_calls"
    assert reply.meta.model_extra == {"reasoning": "Two lookups."}
    assert (reply.meta.usage.prompt_tokens, reply.meta.usage.completion_tokens) == (50, 22)
    body = server.received[0].body
    assert body["tools"] == [
        {
            "type": "function",
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            "strict": False,  # Chat Completions' default, not the Responses API's
        },
        {"type": "function", "name": "get_time", "parameters": None, "strict": True},
    ]
    assert body["tool_choice"] == {"type": "function", "name": "get_time"}
    assert body["parallel_tool_calls"] is True


def test_messages_become_input_items(server: FakeHTTPServer, make_provider: ProviderFactory) -> None:
    server.queue(responses_answer("Sunny, 21 C."))
    messages = [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage.model_validate(
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather where this was taken?"},
                    {"type": "image_url", "image_url": {"url": PNG, "detail": "high"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}},
                ],
            }
        ),
        ChatMessage.model_validate(
            {
                "role": "assistant",
                "content": "Let me look.",
                "tool_calls": [{"id": "call_W", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}],
            }
        ),
        ChatMessage(role="tool", tool_call_id="call_W", content='{"sky": "sunny", "temp_c": 21}'),
    ]

    (reply,) = make_provider().run(call_with(messages=messages, tools=TOOLS), ChunkCollector())

    assert reply.content == "Sunny, 21 C." and reply.meta.finish_reason == "stop"
    assert server.received[0].body["input"] == [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "Weather where this was taken?"},
                {"type": "input_image", "image_url": PNG, "detail": "high"},
                {"type": "input_image", "image_url": "https://example.com/a.jpg", "detail": "auto"},
            ],
        },
        {"role": "assistant", "content": "Let me look."},
        {"type": "function_call", "call_id": "call_W", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call_output", "call_id": "call_W", "output": '{"sky": "sunny", "temp_c": 21}'},
    ]
    assert "tool_choice" not in server.received[0].body


def test_non_streamed_function_calls(server: FakeHTTPServer, make_provider: ProviderFactory) -> None:
    calls = [("call_A", "get_weather", '{"city": "Oslo"}')]
    server.queue(Reply(json_body=response_object(text=None, function_calls=calls)))
    collect = ChunkCollector()

    (reply,) = make_provider().run(call_with(stream=False, tools=TOOLS, tool_choice="required"), collect)

    assert reply.tool_calls is not None
    assert [(c.id, c.function.name, c.function.arguments) for c in reply.tool_calls] == calls
    assert reply.meta.finish_reason == "tool_calls"
    assert [chunk.tool_call for chunk in collect.chunks] == [
        ToolCallDelta(index=0, id="call_A", name="get_weather", arguments_delta='{"city": "Oslo"}')
    ]
    assert server.received[0].body["tool_choice"] == "required"


def test_a_json_schema_goes_as_text_format(server: FakeHTTPServer, make_provider: ProviderFactory) -> None:
    server.queue(responses_answer('{"city": ', '"Paris"}'))

    (reply,) = make_provider().run(make_call(response_format=CITY_FORMAT), ChunkCollector())

    assert reply.content == '{"city": "Paris"}'
    assert server.received[0].body["text"] == {
        "format": {"type": "json_schema", "name": "city", "schema": CITY_FORMAT["json_schema"]["schema"]}
    }


def test_several_choices_are_unsupported_even_when_an_entry_claims_them(
    server: FakeHTTPServer, make_provider: ProviderFactory
) -> None:
    error, _ = run_failing(make_provider(supports_n=True), n=2)
    assert isinstance(error, errors.Unsupported)
    assert server.received == []


def chain(providers: list[ChatProvider], listener: ChainRecorder, **generation_kwargs: Any) -> ChainRun:
    return ChainRun(
        providers=providers,
        messages=[ChatMessage(role="user", content="Capital of France, as JSON?")],
        generation_kwargs=generation_kwargs,
        deadline=time.monotonic() + 10,
        listener=listener,
    )


def test_an_invalid_json_answer_falls_back(server: FakeHTTPServer, make_provider: ProviderFactory) -> None:
    server.queue(responses_answer("The capital is Paris."), responses_answer('{"city": "Paris"}'))
    listener = ChainRecorder()
    run = chain([make_provider(max_retries=1), make_provider()], listener, response_format=CITY_FORMAT)

    outcome = run.execute()

    assert outcome.succeeded_index == 1 and outcome.replies[0].content == '{"city": "Paris"}'
    assert [(r.outcome, r.error_type) for r in run.attempts] == [("failed", "invalid_output"), ("succeeded", None)]
    assert [record.error_type for record in listener.failed] == ["invalid_output"]
    assert len(server.received) == 2


def test_two_choices_skip_the_responses_api(server: FakeHTTPServer, make_provider: ProviderFactory) -> None:
    chat = provider_factory("chat", OpenAIConfig, OpenAIChatProvider, model="gpt-4.1-mini", max_retries=0)
    events = [
        chat_chunk("A", index=0, finish_reason="stop"),
        chat_chunk("B", index=1, finish_reason="stop"),
        usage_chunk(9, 2),
        "[DONE]",
    ]
    server.queue(Reply(events=events))

    run = chain([make_provider(), chat()], ChainRecorder(), n=2)
    outcome = run.execute()

    assert [(r.provider, r.outcome, r.error_type) for r in run.attempts] == [
        ("thinker", "skipped", "unsupported"),
        ("chat", "succeeded", None),
    ]
    assert [reply.content for reply in outcome.replies] == ["A", "B"]
    assert [request.path for request in server.received] == ["/v1/chat/completions"]
