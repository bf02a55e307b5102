"""Messages v2 end to end through a real worker and redis-server: an agent loop with a
fallback in the middle of each turn, several choices streaming under their own index, the
worker's image caps, and bad v2 input refused with the field named and a dead letter.

The loop: the chain is a scripted provider that streams two tool-call fragments (then two
pieces of text, on the next turn) and is cut off, then an OpenAI provider against a fake
server on 127.0.0.1 that streams its tool call in fragments across several events, then its
final answer once the tool result is in the conversation. The test appends the reply message
as it is and the tool result, as a producer in any language would."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from celery import Celery

from tasks.contract.schemas import TASK_NAME, ChatMessage, ChatReply, StreamEvent
from tasks.producer.client import CascadeClient
from tasks.producer.conversation import tool_calls_of, with_reply, with_tool_results
from tests.providers.openai_wire import chat_stream, tool_call_stream, usage_chunk
from tests.support.fake_http import FakeHTTPServer, Reply
from tests.support.stack import local_stack
from tests.support.stored import dead_letters
from tests.support.stream_contract import StreamedCall, assert_coherent, reconstruct_text, reconstruct_tool_calls
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

API_KEY = "sk-test-agent-loop-0123456789"
MAX_IMAGE_BYTES = 2_000
TWIN_TEXT = "Each choice streams this sentence under its own index."
CONFIG = """
[providers.steady]
type = "scripted"
text = "ready"

[providers.tool_cutter]
type = "scripted"
text = "Prose that never finishes."
chunk_size = 6
fail = "cut"
fail_after_chunks = 2
tool_calls = [{{ name = "get_weather", arguments = '{{"city": "Lyon"}}', id = "call_cut" }}]

[providers.gpt]
type = "openai"
model = "gpt-4.1-mini"
api_base_url = "{openai}/v1"
max_retries = 0
timeout_s = 10

[providers.twins]
type = "scripted"
text = "{twin_text}"
chunk_size = 3
chunk_delay_ms = 1
supports_n = true

[chains]
default = ["steady"]
agent = ["tool_cutter", "gpt"]
twins = ["twins"]
"""
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
# The fake server's fragments are 50 ms apart: far longer than the worker's coalescing window,
# so they reach subscribers as several events.
FRAGMENT_GAP_S = 0.05


@dataclass
class Stack:
    url: str
    openai: FakeHTTPServer


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("agent-loop")
    with FakeHTTPServer() as openai:
        config = CONFIG.format(openai=openai.url, twin_text=TWIN_TEXT)
        env = {
            "OPENAI_API_KEY": API_KEY,
            "CASCADE_MAX_INPUT_IMAGE_BYTES": str(MAX_IMAGE_BYTES),
            "CASCADE_ALLOW_IMAGE_URLS": "false",
        }
        with local_stack(workdir, config, extra_env=env) as local:
            yield Stack(local.url, openai)


@pytest.fixture
def client(stack: Stack) -> Iterator[CascadeClient]:
    with CascadeClient(stack.url) as producer:
        yield producer


def follow(client: CascadeClient, request_id: str) -> tuple[list[StreamEvent], ChatReply]:
    events = list(client.events(request_id, timeout_s=60))
    reply = client.reply(request_id)
    assert_coherent(events, reply, request_id)
    assert reply is not None
    return events, reply


def attempt_chunks(events: list[StreamEvent], provider: str) -> list[StreamEvent]:
    return [e for e in events if e.type == "chunk" and e.provider == provider]


def test_an_agent_loop_with_a_fallback_in_each_turn(stack: Stack, client: CascadeClient) -> None:
    fragments = ['{"ci', 'ty": "Pa', 'ris"}']
    stack.openai.queue(
        Reply(
            events=[*tool_call_stream(("call_w1", "get_weather", fragments)), usage_chunk(30, 9), "[DONE]"],
            event_delay_s=FRAGMENT_GAP_S,
        ),
        Reply(events=chat_stream("It is 18 °C ", "in Paris ", "right now."), event_delay_s=FRAGMENT_GAP_S),
    )
    messages: list[dict[str, Any]] = [{"role": "user", "content": "What is the weather in Paris?"}]

    # Turn 1: the cutter streams two fragments and is cut; the fallback calls the tool.
    first_id = client.submit(messages=messages, tools=[WEATHER], tool_choice="auto", chain="agent")
    events, reply = follow(client, first_id)
    assert reply.status == "succeeded"
    types = [e.type for e in events]
    assert types.count("fallback") == 1
    fallback = events[types.index("fallback")]
    assert (fallback.provider, fallback.error_type) == ("tool_cutter", "stream_interrupted")
    cut = attempt_chunks(events, "tool_cutter")
    assert cut and all(e.tool_call is not None and e.delta is None and e.index == 0 for e in cut)
    assert cut[0].tool_call is not None and (cut[0].tool_call.id, cut[0].tool_call.name) == ("call_cut", "get_weather")
    called = attempt_chunks(events, "gpt")
    assert len(called) >= 2  # the call's fragments came across several events
    assert all(e.tool_call is not None and e.index == 0 and e.seq > fallback.seq for e in called)
    assert reconstruct_tool_calls(events) == [StreamedCall("call_w1", "get_weather", '{"city": "Paris"}')]
    answer = reply.replies[0]
    assert answer.meta.finish_reason == "tool_calls" and answer.content is None
    assert [(c.id, c.function.name, c.function.arguments) for c in tool_calls_of(reply)] == [
        ("call_w1", "get_weather", '{"city": "Paris"}')
    ]
    assert reply.meta.provider == "gpt"
    assert [(a.provider, a.error_type) for a in reply.meta.attempts] == [
        ("tool_cutter", "stream_interrupted"),
        ("gpt", None),
    ]
    sent = stack.openai.received[-1].body
    assert sent["tools"][0]["function"]["name"] == "get_weather" and sent["tool_choice"] == "auto"

    # The reply's message goes back as it is, then the tool's result.
    messages = with_reply(messages, reply)
    assert ChatMessage.model_validate(messages[-1]) == answer.to_message()
    messages = with_tool_results(messages, {"call_w1": json.dumps({"temperature_c": 18})})

    # Turn 2: the cutter streams two pieces of text and is cut; the fallback answers.
    second_id = client.submit(messages=messages, tools=[WEATHER], chain="agent")
    events, reply = follow(client, second_id)
    assert reply.status == "succeeded"
    assert [e.type for e in events].count("fallback") == 1
    assert reply.replies[0].content == "It is 18 °C in Paris right now." == reconstruct_text(events)
    assert reply.replies[0].meta.finish_reason == "stop" and reply.replies[0].tool_calls is None
    wire = stack.openai.received[-1].body["messages"]
    assert wire[1]["role"] == "assistant" and wire[1]["tool_calls"][0]["id"] == "call_w1"
    assert wire[2] == {"role": "tool", "tool_call_id": "call_w1", "content": '{"temperature_c": 18}'}


def test_each_choice_streams_under_its_own_index(client: CascadeClient) -> None:
    request_id = client.submit(prompt="Say it twice", chain="twins", generation_kwargs={"n": 2})
    events, reply = follow(client, request_id)  # the contract: each index spells its own reply
    assert reply.status == "succeeded"
    assert [answer.content for answer in reply.replies] == [TWIN_TEXT, TWIN_TEXT]
    assert [answer.meta.index for answer in reply.replies] == [0, 1]
    chunks = [e for e in events if e.type == "chunk"]
    assert {e.index for e in chunks} == {0, 1}
    for index in (0, 1):
        assert reconstruct_text(events, index) == TWIN_TEXT


# --- bad input: a failed reply naming the field, and a dead letter ------------------------------


PNG = b"\x89PNG\r\n\x1a\n" + bytes(24)


def image(data: bytes, mime: str = "image/png") -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}}


def user_with(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": "Look"}, *parts]}]


BAD_INPUT = [
    pytest.param(
        {"prompt": "hi", "tools": [{"type": "function", "function": {"name": "get weather"}}]},
        "invalid_request",
        "tools.0.function.name",
        id="malformed-tool",
    ),
    pytest.param(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "call_x", "content": "18"}]},
        "invalid_request",
        "messages.1.tool_call_id",
        id="tool-message-without-its-call",
    ),
    pytest.param(
        {"messages": user_with(image(b"GIF89a not a png"))},
        "invalid_request",
        "messages.0.content.1.image_url.url",
        id="image-that-is-not-an-image",
    ),
    pytest.param(
        {
            "prompt": "hi",
            "generation_kwargs": {
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "thing"}}}
            },
        },
        "invalid_request",
        "generation_kwargs.response_format.json_schema.schema",
        id="schema-that-is-not-a-schema",
    ),
    pytest.param(
        {"messages": user_with(image(PNG + bytes(MAX_IMAGE_BYTES)))},
        "request_too_large",
        "messages.0.content.1.image_url",
        id="images-past-the-worker-cap",
    ),
    pytest.param(
        {"messages": user_with({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}})},
        "invalid_request",
        "messages.0.content.1.image_url.url",
        id="image-url-the-worker-does-not-take",
    ),
    pytest.param(
        {"prompt": "hi", "hallucination_score": {"n_samples": 32, "m": 16}},
        "invalid_request",
        "hallucination_score",
        id="scoring-config-out-of-range",
    ),
]


@pytest.fixture(scope="module")
def producer(stack: Stack) -> Iterator[Celery]:
    """A bare Celery producer: the Python client would refuse these requests before sending."""
    app = Celery("agent-loop-producer", broker=stack.url, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"])
    try:
        yield app
    finally:
        app.close()


@pytest.mark.parametrize(("fields", "error_type", "field"), BAD_INPUT)
def test_bad_v2_input_is_a_failed_reply_naming_the_field_and_a_dead_letter(
    stack: Stack, client: CascadeClient, producer: Celery, fields: dict[str, Any], error_type: str, field: str
) -> None:
    request_id = uuid.uuid4().hex
    producer.send_task(TASK_NAME, kwargs={"request": {"request_id": request_id, **fields}}, queue="chat")
    events = list(client.events(request_id, timeout_s=60))
    reply = client.reply(request_id)
    assert_coherent(events, reply, request_id, expect_start=False)
    assert reply is not None and reply.status == "failed"
    assert [e.type for e in events] == ["error"]
    assert reply.error is not None and reply.error.type == error_type
    assert field in reply.error.message, reply.error.message
    rdb = redis.Redis.from_url(stack.url)
    try:
        letters = wait_until(
            lambda: [d for d in dead_letters(rdb) if d.get("request_id") == request_id],
            timeout_s=15,
            what="dead letter",
        )
    finally:
        rdb.close()
    assert len(letters) == 1 and letters[0]["reason"] == error_type
