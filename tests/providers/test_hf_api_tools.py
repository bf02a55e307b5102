"""Messages v2 on ``hf_api`` at the wire level (huggingface_hub's real ``InferenceClient`` against
a fake TGI / OpenAI-compatible endpoint): tools and tool choice on the wire, tool calls streamed
in fragments (TGI's list and its older single object, without ids; a router's with ids),
tool results and images going back, TGI's grammar for structured output, ``n`` = 2
interleaved, and in the chain: an invalid JSON answer falling back, a provider without images
skipped."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest

from providers.base import ChatProvider, ProviderCall
from providers.chain import ChainRun
from providers.huggingface.api import HfApiProvider
from settings.providers import HfApiConfig
from tasks.contract.schemas import ChatMessage, NamedToolChoice, ToolCallDelta, ToolDefinition
from tests.fakes.http import FakeHTTPServer, Reply
from tests.providers.tgi_wire import chunk, streamed, tool_call_chunk, tool_call_completion, usage_chunk
from tests.support.calls import ChainRecorder, ChunkCollector, make_call

TOOLS = [
    ToolDefinition.model_validate(
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ),
    ToolDefinition.model_validate({"type": "function", "function": {"name": "get_time"}}),
]
PNG = (
    "data:image/png;base64,"
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAfbLI3wAAAABJRU5ErkJggg=="
)
CITY_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
CITY_FORMAT = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA}}


@pytest.fixture(autouse=True)
def _no_ambient_token(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HF_API_TOKEN", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def tgi(url: str, **fields: Any) -> HfApiProvider:
    return HfApiProvider("tgi", HfApiConfig(api_type="text_generation_inference", url=url, max_retries=0, **fields))


def endpoint(url: str, **fields: Any) -> HfApiProvider:
    return HfApiProvider("endpoint", HfApiConfig(api_type="inference_endpoints", url=url, max_retries=0, **fields))


def call_with(*, stream: bool = True, messages: list[ChatMessage] | None = None, **fields: Any) -> ProviderCall:
    call = make_call(stream=stream) if messages is None else make_call(stream=stream, messages=messages)
    return dataclasses.replace(call, **fields)


def test_tgi_tool_call_fragments_without_ids(server: FakeHTTPServer) -> None:
    events: list[Any] = [
        tool_call_chunk(0, '{"', name="get_weather"),
        tool_call_chunk(0, "city"),
        tool_call_chunk(0, '": "Paris'),
        tool_call_chunk(0, '"}', finish="eos_token"),
        usage_chunk(30, 4),
        "[DONE]",
    ]
    server.queue(Reply(events=events, chunked=True))
    collect = ChunkCollector()

    (reply,) = tgi(server.url).run(call_with(tools=TOOLS, tool_choice="required", parallel_tool_calls=False), collect)

    deltas = [chunk.tool_call for chunk in collect.chunks]
    assert deltas[0] is not None and deltas[0].id is not None and deltas[0].id.startswith("call_")
    assert deltas == [
        ToolCallDelta(index=0, id=deltas[0].id, name="get_weather", arguments_delta='{"'),
        ToolCallDelta(index=0, arguments_delta="city"),
        ToolCallDelta(index=0, arguments_delta='": "Paris'),
        ToolCallDelta(index=0, arguments_delta='"}'),
    ]
    assert reply.tool_calls is not None
    assert [(c.id, c.function.name, c.function.arguments) for c in reply.tool_calls] == [
        (deltas[0].id, "get_weather", '{"city": "Paris"}')
    ]
    assert reply.content is None and reply.meta.finish_reason == "tool_calls"
    body = server.received[0].body
    assert body["tools"] == [tool.model_dump(mode="json", exclude_none=True) for tool in TOOLS]
    assert body["tool_choice"] == "required"
    assert body["parallel_tool_calls"] is False


def test_older_tgi_single_object_fragments(server: FakeHTTPServer) -> None:
    events = [
        tool_call_chunk(0, '{"city":', name="get_weather", listed=False),
        tool_call_chunk(0, ' "Rome"}', finish="eos_token", listed=False),
        "[DONE]",
    ]
    server.queue(Reply(events=events, chunked=True))

    (reply,) = tgi(server.url).run(call_with(tools=TOOLS), ChunkCollector())

    assert reply.tool_calls is not None and reply.tool_calls[0].function.arguments == '{"city": "Rome"}'


def test_parallel_calls_with_ids_from_an_openai_compatible_endpoint(server: FakeHTTPServer) -> None:
    events = [
        tool_call_chunk(0, "", name="get_weather", call_id="call_W"),
        tool_call_chunk(0, '{"city": '),
        tool_call_chunk(1, "", name="get_time", call_id="call_T"),
        tool_call_chunk(0, '"Oslo"}'),
        tool_call_chunk(1, "{}", finish="tool_calls"),
        "[DONE]",
    ]
    server.queue(Reply(events=events, chunked=True))
    collect = ChunkCollector()
    choice = NamedToolChoice.model_validate({"type": "function", "function": {"name": "get_weather"}})

    (reply,) = endpoint(server.url).run(call_with(tools=TOOLS, tool_choice=choice), collect)

    assert [chunk.tool_call for chunk in collect.chunks] == [
        ToolCallDelta(index=0, id="call_W", name="get_weather"),
        ToolCallDelta(index=0, arguments_delta='{"city": '),
        ToolCallDelta(index=1, id="call_T", name="get_time"),
        ToolCallDelta(index=0, arguments_delta='"Oslo"}'),
        ToolCallDelta(index=1, arguments_delta="{}"),
    ]
    assert reply.tool_calls is not None
    assert [(c.id, c.function.arguments) for c in reply.tool_calls] == [
        ("call_W", '{"city": "Oslo"}'),
        ("call_T", "{}"),
    ]
    assert server.received[0].body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert "parallel_tool_calls" not in server.received[0].body


def test_tool_results_and_images_go_back(server: FakeHTTPServer) -> None:
    server.queue(streamed("Sunny", " in Paris."))
    messages = [
        ChatMessage.model_validate(
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Where is this?"},
                    {"type": "image_url", "image_url": {"url": PNG}},
                ],
            }
        ),
        ChatMessage.model_validate(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "call_1", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}],
            }
        ),
        ChatMessage(role="tool", tool_call_id="call_1", content="sunny"),
    ]

    (reply,) = tgi(server.url, supports_images=True).run(call_with(messages=messages, tools=TOOLS), ChunkCollector())

    assert reply.content == "Sunny in Paris." and reply.tool_calls is None
    sent = server.received[0].body["messages"]
    assert sent == [message.model_dump(mode="json", exclude_none=True) for message in messages]
    assert sent[0]["content"][1] == {"type": "image_url", "image_url": {"url": PNG}}


def test_non_streamed_tool_calls_with_object_arguments(server: FakeHTTPServer) -> None:
    server.queue(Reply(json_body=tool_call_completion(("get_weather", {"city": "Oslo"}), ("get_time", "{}"))))

    (reply,) = tgi(server.url).run(call_with(stream=False, tools=TOOLS), ChunkCollector())

    assert reply.tool_calls is not None
    assert [(c.id, c.function.name, c.function.arguments) for c in reply.tool_calls] == [
        ("0", "get_weather", '{"city": "Oslo"}'),
        ("1", "get_time", "{}"),
    ]
    assert reply.meta.finish_reason == "tool_calls"
    assert (reply.meta.usage.prompt_tokens, reply.meta.usage.completion_tokens) == (30, 12)


@pytest.mark.parametrize(
    ("api_type", "response_format", "sent"),
    [
        ("text_generation_inference", CITY_FORMAT, {"type": "json_object", "value": CITY_SCHEMA}),
        ("text_generation_inference", {"type": "json_object"}, {"type": "json_object", "value": {"type": "object"}}),
        ("inference_endpoints", CITY_FORMAT, {"type": "json_object", "value": CITY_SCHEMA}),
    ],
)
def test_response_format_as_the_server_reads_it(
    server: FakeHTTPServer, api_type: str, response_format: dict[str, Any], sent: dict[str, Any]
) -> None:
    server.queue(streamed('{"city": "Paris"}'))
    provider = HfApiProvider("hf", HfApiConfig(api_type=api_type, url=server.url))  # type: ignore[arg-type]

    provider.run(make_call(response_format=response_format), ChunkCollector())

    assert server.received[0].body["response_format"] == sent


def test_two_choices_interleaved(server: FakeHTTPServer) -> None:
    second = chunk("Ly")
    second["choices"][0]["index"] = 1
    last = chunk("on", "length")
    last["choices"][0]["index"] = 1
    events = [chunk("Par"), second, chunk("is", "eos_token"), last, usage_chunk(21, 4), "[DONE]"]
    server.queue(Reply(events=events, chunked=True))
    collect = ChunkCollector()

    replies = endpoint(server.url, supports_n=True).run(make_call(n=2), collect)

    assert [(chunk.index, chunk.content) for chunk in collect.chunks] == [(0, "Par"), (1, "Ly"), (0, "is"), (1, "on")]
    assert [(r.meta.index, r.content, r.meta.finish_reason) for r in replies] == [
        (0, "Paris", "stop"),
        (1, "Lyon", "length"),
    ]
    assert server.received[0].body["n"] == 2


def chain(providers: list[ChatProvider], listener: ChainRecorder, **fields: Any) -> ChainRun:
    return ChainRun(
        providers=providers,
        messages=fields.pop("messages", [ChatMessage(role="user", content="Capital of France, as JSON?")]),
        deadline=time.monotonic() + 10,
        listener=listener,
        **{"generation_kwargs": {}, **fields},
    )


def test_an_invalid_json_answer_falls_back(server: FakeHTTPServer) -> None:
    server.queue(streamed("Paris", " it is."), streamed('{"city": ', '"Paris"}'))
    listener = ChainRecorder()
    run = chain([tgi(server.url), endpoint(server.url)], listener, generation_kwargs={"response_format": CITY_FORMAT})

    outcome = run.execute()

    assert outcome.succeeded_index == 1 and outcome.replies[0].content == '{"city": "Paris"}'
    assert [(r.provider, r.outcome, r.error_type) for r in run.attempts] == [
        ("tgi", "failed", "invalid_output"),
        ("endpoint", "succeeded", None),
    ]
    assert [record.attempt for record in listener.failed] == [1]
    assert listener.text_of(1) == "Paris it is."


def test_a_provider_without_images_is_skipped(server: FakeHTTPServer) -> None:
    server.queue(streamed("A cat."))
    image = ChatMessage.model_validate(
        {
            "role": "user",
            "content": [{"type": "text", "text": "What?"}, {"type": "image_url", "image_url": {"url": PNG}}],
        }
    )
    run = chain([tgi(server.url), endpoint(server.url, supports_images=True)], ChainRecorder(), messages=[image])

    outcome = run.execute()

    assert outcome.succeeded_index == 1 and outcome.replies[0].content == "A cat."
    assert [(r.outcome, r.error_type) for r in run.attempts] == [("skipped", "unsupported"), ("succeeded", None)]
    assert len(server.received) == 1
