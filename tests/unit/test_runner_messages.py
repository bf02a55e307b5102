"""RequestRunner and messages v2 (tasks/runner.py over fakeredis): the request's tools reach
the provider, tool calls stream as ``tool_call`` fragments under their choice's ``index``,
every choice of ``n`` streams under its own index, a cut after some fragments falls back, and
the stored reply's message goes back into the next request as it is."""

from __future__ import annotations

import json
import time
from typing import Any

import fakeredis

from settings import ScriptedConfig, Settings
from tasks.contract import keys
from tasks.contract.schemas import ChatReply, ChatRequest, StreamEvent
from tasks.producer.conversation import with_reply, with_tool_results
from tasks.runner import RequestRunner, TaskContext
from tests.support.stream_contract import StreamedCall, assert_coherent, reconstruct_text, reconstruct_tool_calls
from worker.runtime import WorkerRuntime, build_runtime

RID = "v2-run"
ARGUMENTS = '{"city": "Paris", "unit": "celsius"}'
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALLER = {
    "text": "It is 18 degrees in Paris.",
    "tool_calls": [{"name": "get_weather", "arguments": ARGUMENTS, "id": "call_1"}],
}


def runtime_for(
    client: fakeredis.FakeRedis, providers: dict[str, dict[str, Any]], coalesce_ms: float = 0
) -> WorkerRuntime:
    configs = {pid: ScriptedConfig(**{"chunk_size": 5, **entry}) for pid, entry in providers.items()}
    settings = Settings(providers=configs, chains={"default": list(providers)}, coalesce_ms=coalesce_ms)
    return build_runtime(settings, client, worker_name="unit-worker")


def run(runtime: WorkerRuntime, request_id: str = RID, **fields: Any) -> ChatReply:
    request = ChatRequest.model_validate({"request_id": request_id, **fields})
    context = TaskContext(task_id=request_id, queue="chat", started_at_wall=time.time(), started_at=time.monotonic())
    reply = RequestRunner(runtime, request, context).run()
    assert isinstance(reply, ChatReply)
    return reply


def events_of(client: fakeredis.FakeRedis, request_id: str = RID) -> list[StreamEvent]:
    entries = client.xrange(keys.events_stream(request_id))
    return [StreamEvent.model_validate_json(fields[b"event"]) for _id, fields in entries]


def test_the_request_s_tools_reach_the_provider_and_its_calls_stream_as_fragments(
    fake_redis: fakeredis.FakeRedis,
) -> None:
    runtime = runtime_for(fake_redis, {"caller": CALLER})
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    reply = run(runtime, messages=messages, tools=[WEATHER_TOOL], tool_choice="auto")
    events = events_of(fake_redis)
    assert_coherent(events, reply, RID)
    assert reply.status == "succeeded"
    answer = reply.replies[0]
    assert answer.meta.finish_reason == "tool_calls"
    assert answer.content is None
    assert [(c.id, c.function.name, c.function.arguments) for c in answer.tool_calls or []] == [
        ("call_1", "get_weather", ARGUMENTS)
    ]
    chunks = [e for e in events if e.type == "chunk"]
    assert len(chunks) == len(ARGUMENTS) // 5 + 1  # one event per fragment with coalescing off
    assert all(e.index == 0 and e.delta is None and e.tool_call is not None for e in chunks)
    first = chunks[0].tool_call
    assert first is not None and (first.id, first.name) == ("call_1", "get_weather")
    assert all(e.tool_call is not None and e.tool_call.id is None for e in chunks[1:])
    assert reconstruct_tool_calls(events) == [StreamedCall("call_1", "get_weather", ARGUMENTS)]
    assert reply.meta.timings is not None and reply.meta.timings.ttft_ms is not None  # a fragment is a first token

    # The agent loop's next turn: the reply's message appended as it is, a tool result after it.
    following = with_tool_results(with_reply(messages, reply), {"call_1": json.dumps({"temperature": 18})})
    assert following[1] == {
        "role": "assistant",
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ARGUMENTS}}
        ],
    }
    final = run(runtime, "v2-run-2", messages=following, tools=[WEATHER_TOOL])
    assert final.status == "succeeded"
    assert final.replies[0].content == CALLER["text"] == reconstruct_text(events_of(fake_redis, "v2-run-2"))
    assert final.replies[0].meta.finish_reason == "stop"


def test_without_tools_the_same_provider_answers_in_text(fake_redis: fakeredis.FakeRedis) -> None:
    reply = run(runtime_for(fake_redis, {"caller": CALLER}), prompt="Weather in Paris?")
    assert reply.replies[0].tool_calls is None
    assert reply.replies[0].content == CALLER["text"] == reconstruct_text(events_of(fake_redis))


def test_each_choice_streams_under_its_own_index(fake_redis: fakeredis.FakeRedis) -> None:
    runtime = runtime_for(fake_redis, {"steady": {"text": "one two three four", "supports_n": True}}, coalesce_ms=50)
    reply = run(runtime, prompt="count", generation_kwargs={"n": 3})
    events = events_of(fake_redis)
    assert_coherent(events, reply, RID)
    assert [answer.meta.index for answer in reply.replies] == [0, 1, 2]
    for index in range(3):
        assert reconstruct_text(events, index) == "one two three four"
    assert {e.index for e in events if e.type == "chunk"} == {0, 1, 2}


def test_a_cut_after_some_fragments_falls_back_and_its_fragments_are_void(fake_redis: fakeredis.FakeRedis) -> None:
    cutter = {**CALLER, "fail": "cut", "fail_after_chunks": 2}
    backup = {
        "text": "unused",
        "tool_calls": [{"name": "get_weather", "arguments": '{"city": "Lyon"}', "id": "call_9"}],
    }
    runtime = runtime_for(fake_redis, {"cutter": cutter, "backup": backup})
    reply = run(runtime, prompt="Weather?", tools=[WEATHER_TOOL])
    events = events_of(fake_redis)
    assert_coherent(events, reply, RID)
    types = [e.type for e in events]
    assert types[0] == "start" and types[-1] == "done"
    fallback = types.index("fallback")
    assert types[1:fallback] == ["chunk", "chunk"]  # the cut attempt's two fragments, then the fallback
    assert reply.meta.provider == "backup"
    assert [(a.provider, a.error_type) for a in reply.meta.attempts] == [
        ("cutter", "stream_interrupted"),
        ("backup", None),
    ]
    assert reconstruct_tool_calls(events) == [StreamedCall("call_9", "get_weather", '{"city": "Lyon"}')]
