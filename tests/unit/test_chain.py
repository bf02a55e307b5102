"""The fallback chain (providers/chain.py) on scripted providers, with a fake ``wait``."""

from __future__ import annotations

import gc
import random
import time
import weakref
from collections.abc import Callable
from typing import Any

import pytest

from providers import errors
from providers.base import ChatProvider, OnChunk, ProviderCall, StreamingChunk
from providers.chain import ChainOutcome, ChainRun
from providers.registry import build_provider
from settings import ScriptedConfig
from tasks.contract.schemas import AssistantReply, AttemptRecord, ChatMessage, ReplyMeta, ToolDefinition
from tests.support.calls import ChainRecorder

TEXT = "Hello from the chain"
FAST = {"backoff_initial_s": 0.1, "backoff_max_s": 0.4}


class RecordingWait:
    """Records requested sleeps instead of sleeping."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


class Cooldowns:
    """A CooldownGate stub: fixed set of cooling providers, counts failures."""

    def __init__(self, cooling: set[str]) -> None:
        self.cooling = cooling
        self.failures: list[str] = []

    def is_cooling_down(self, provider: ChatProvider) -> bool:
        return provider.provider_id in self.cooling

    def record_failure(self, provider: ChatProvider) -> None:
        self.failures.append(provider.provider_id)


class ChunkThenFail(ChatProvider):
    """Streams one chunk, then raises a transient error (as an HTTP stream cut with a 5xx)."""

    def run(self, call: ProviderCall, on_chunk: OnChunk) -> list[AssistantReply]:
        on_chunk(StreamingChunk(content="partial "))
        raise errors.ServerError("upstream 502 mid-stream", status_code=502)


def scripted(provider_id: str, **fields: Any) -> ChatProvider:
    return build_provider(provider_id, ScriptedConfig(**{"text": TEXT, "chunk_size": 5, **FAST, **fields}))


def make_run(
    providers: list[ChatProvider],
    listener: ChainRecorder,
    wait: Callable[[float], None],
    *,
    deadline_s: float = 60.0,
    messages: list[ChatMessage] | None = None,
    generation_kwargs: dict[str, Any] | None = None,
    **kw: Any,
) -> ChainRun:
    return ChainRun(
        providers=providers,
        messages=messages or [ChatMessage(role="user", content="hi")],
        generation_kwargs=generation_kwargs or {},
        deadline=time.monotonic() + deadline_s,
        listener=listener,
        wait=wait,
        worker="unit-worker",
        rng=random.Random(7),
        **kw,
    )


def outcomes(run: ChainRun) -> list[tuple[str, str, str | None]]:
    return [(r.provider, r.outcome, r.error_type) for r in run.attempts]


def test_success_on_the_first_provider() -> None:
    listener, wait = ChainRecorder(), RecordingWait()
    run = make_run([scripted("a"), scripted("b")], listener, wait)
    outcome = run.execute()
    assert outcome.error is None
    assert outcome.succeeded_index == 0
    assert outcome.provider is not None and outcome.provider.provider_id == "a"
    assert outcome.replies[0].content == TEXT
    assert outcomes(run) == [("a", "succeeded", None)]
    assert run.attempts[0].chunks == 4
    assert run.attempts[0].worker == "unit-worker"
    assert listener.text_of(1) == TEXT
    assert listener.failed == [] and wait.calls == []


def test_transient_error_is_retried_then_succeeds() -> None:
    listener, wait = ChainRecorder(), RecordingWait()
    run = make_run([scripted("a", fail="server_error", fail_times=2, max_retries=2), scripted("b")], listener, wait)
    outcome = run.execute()
    assert outcome.succeeded_index == 0
    assert outcomes(run) == [("a", "failed", "server_error"), ("a", "failed", "server_error"), ("a", "succeeded", None)]
    assert [r.attempt for r in run.attempts] == [1, 2, 3]
    assert [r.attempt for r in listener.failed] == [1, 2]
    assert len(wait.calls) == 2
    assert 0.05 <= wait.calls[0] <= 0.1  # full jitter within [ceiling/2, ceiling]
    assert 0.1 <= wait.calls[1] <= 0.2
    assert listener.text_of(3) == TEXT


def test_retry_after_is_honoured() -> None:
    wait = RecordingWait()
    run = make_run([scripted("a", fail="rate_limit", retry_after_s=3.0, fail_times=1)], ChainRecorder(), wait)
    assert run.execute().succeeded_index == 0
    assert len(wait.calls) == 1
    assert wait.calls[0] >= 3.0


def test_retry_after_beyond_the_maximum_falls_through_at_once() -> None:
    wait = RecordingWait()
    a = scripted("a", fail="rate_limit", retry_after_s=120.0, retry_after_max_s=30.0, max_retries=3)
    run = make_run([a, scripted("b")], ChainRecorder(), wait)
    outcome = run.execute()
    assert outcome.succeeded_index == 1
    assert outcomes(run) == [("a", "failed", "rate_limited"), ("b", "succeeded", None)]
    assert wait.calls == []


def test_exhausted_transient_errors_fall_through() -> None:
    listener, wait = ChainRecorder(), RecordingWait()
    run = make_run([scripted("a", fail="timeout", max_retries=2), scripted("b")], listener, wait)
    outcome = run.execute()
    assert outcome.succeeded_index == 1
    assert outcomes(run) == [("a", "failed", "timeout")] * 3 + [("b", "succeeded", None)]
    assert len(wait.calls) == 2
    assert listener.text_of(4) == TEXT


@pytest.mark.parametrize("kind", ["auth", "unknown_model", "context_length", "content_filter", "bad_request"])
def test_fatal_errors_fall_through_without_retry(kind: str) -> None:
    listener, wait = ChainRecorder(), RecordingWait()
    run = make_run([scripted("a", fail=kind, max_retries=5), scripted("b")], listener, wait)
    outcome = run.execute()
    assert outcome.succeeded_index == 1
    assert outcomes(run) == [("a", "failed", kind), ("b", "succeeded", None)]
    assert wait.calls == []
    assert len(listener.failed) == 1


def test_failure_after_chunks_falls_through_and_restarts_from_scratch() -> None:
    listener, wait = ChainRecorder(), RecordingWait()
    run = make_run([scripted("a", fail="cut", fail_after_chunks=2, max_retries=3), scripted("b")], listener, wait)
    outcome = run.execute()
    assert outcome.succeeded_index == 1
    assert outcomes(run) == [("a", "failed", "stream_interrupted"), ("b", "succeeded", None)]
    assert run.attempts[0].chunks == 2
    assert [(r.provider, r.error_type, r.chunks) for r in listener.failed] == [("a", "stream_interrupted", 2)]
    assert listener.text_of(1) == TEXT[:10]
    assert listener.text_of(2) == TEXT  # from the start, not from where "a" stopped
    assert outcome.replies[0].content == TEXT
    assert wait.calls == []


def test_transient_error_after_chunks_becomes_stream_interrupted() -> None:
    listener, wait = ChainRecorder(), RecordingWait()
    cutter = ChunkThenFail("cutter", ScriptedConfig(text="x", max_retries=3))
    run = make_run([cutter, scripted("b")], listener, wait)
    assert run.execute().succeeded_index == 1
    assert outcomes(run)[0] == ("cutter", "failed", "stream_interrupted")
    assert "502" in (run.attempts[0].error_message or "")
    assert wait.calls == []  # never retried: that would replay text already streamed


def test_every_provider_failing() -> None:
    listener = ChainRecorder()
    providers = [scripted("a", fail="server_error", max_retries=1), scripted("b", fail="auth")]
    run = make_run(providers, listener, RecordingWait())
    outcome = run.execute()
    assert outcome.replies == [] and outcome.succeeded_index is None and outcome.provider is None
    assert outcome.error is not None and outcome.error.type == "all_providers_failed"
    assert "a: server_error" in outcome.error.message and "b: auth" in outcome.error.message
    assert outcomes(run) == [("a", "failed", "server_error"), ("a", "failed", "server_error"), ("b", "failed", "auth")]
    assert len(listener.failed) == 3


@pytest.mark.parametrize("stop", [errors.Cancelled, errors.DeadlineExceeded])
def test_a_stop_from_the_listener_ends_the_chain(stop: type[errors.RequestStopped]) -> None:
    listener = ChainRecorder(stop_on_chunk=2, stop=stop)
    run = make_run([scripted("a", max_retries=3), scripted("b")], listener, RecordingWait())
    with pytest.raises(stop):
        run.execute()
    assert outcomes(run) == [("a", "stopped", stop.code)]
    assert run.attempts[0].chunks == 2
    assert listener.failed == []
    assert {provider for provider, _a, _c in listener.chunks} == {"a"}


def test_a_stop_during_backoff_ends_the_chain() -> None:
    def cancelled_wait(_seconds: float) -> None:
        raise errors.Cancelled("cancelled while waiting")

    run = make_run([scripted("a", fail="server_error", max_retries=3), scripted("b")], ChainRecorder(), cancelled_wait)
    with pytest.raises(errors.Cancelled):
        run.execute()
    assert [r.provider for r in run.attempts] == ["a"]


def test_retries_never_wait_past_the_deadline() -> None:
    wait = RecordingWait()
    a = scripted("a", fail="rate_limit", retry_after_s=5.0, max_retries=5)
    run = make_run([a, scripted("b")], ChainRecorder(), wait, deadline_s=1.0)
    outcome = run.execute()
    assert wait.calls == []  # a 5 s Retry-After cannot fit in the 1 s left
    assert outcomes(run) == [("a", "failed", "rate_limited"), ("b", "succeeded", None)]
    assert outcome.succeeded_index == 1


def test_cooling_provider_is_skipped_and_failures_recorded() -> None:
    gate = Cooldowns({"a"})
    providers = [scripted("a"), scripted("b", fail="auth"), scripted("c")]
    run = make_run(providers, ChainRecorder(), RecordingWait(), cooldowns=gate)
    outcome = run.execute()
    assert outcome.succeeded_index == 2
    assert outcomes(run) == [
        ("a", "skipped", "provider_unavailable"),
        ("b", "failed", "auth"),
        ("c", "succeeded", None),
    ]
    assert gate.failures == ["b"]
    meta = run.meta(outcome)
    assert meta["total_attempts"] == 2  # the skip is recorded but is no call
    assert meta["failed_chat_generators"] == ["b"]


def test_request_specific_failures_do_not_count_toward_cooldown() -> None:
    gate = Cooldowns(set())
    providers = [scripted("a", fail="content_filter"), scripted("b", fail="timeout", max_retries=1), scripted("c")]
    run = make_run(providers, ChainRecorder(), RecordingWait(), cooldowns=gate)
    assert run.execute().succeeded_index == 2
    assert gate.failures == ["b", "b"]


def test_every_provider_cooling_down() -> None:
    run = make_run([scripted("a"), scripted("b")], ChainRecorder(), RecordingWait(), cooldowns=Cooldowns({"a", "b"}))
    outcome = run.execute()
    assert outcome.error is not None and outcome.error.type == "all_providers_failed"
    assert "cooling down" in outcome.error.message
    assert [r.outcome for r in run.attempts] == ["skipped", "skipped"]


def test_meta_keys_on_success() -> None:
    run = make_run([scripted("a", fail="timeout", max_retries=1), scripted("b")], ChainRecorder(), RecordingWait())
    outcome = run.execute()
    meta = run.meta(outcome)
    assert set(meta) == {
        "successful_chat_generator_index",
        "successful_chat_generator_class",
        "total_attempts",
        "failed_chat_generators",
        "provider",
        "attempts",
    }
    assert meta["successful_chat_generator_index"] == 1
    assert meta["successful_chat_generator_class"] == "ScriptedProvider"
    assert meta["total_attempts"] == 3
    assert meta["failed_chat_generators"] == ["a"]
    assert meta["provider"] == "b"
    assert [r.provider for r in meta["attempts"]] == ["a", "a", "b"]


def test_meta_without_an_outcome() -> None:
    run = make_run([scripted("a", fail="auth")], ChainRecorder(), RecordingWait())
    failed: ChainOutcome = run.execute()
    for meta in (run.meta(), run.meta(failed)):
        assert meta["successful_chat_generator_index"] is None
        assert meta["successful_chat_generator_class"] is None
        assert meta["provider"] is None
        assert meta["failed_chat_generators"] == ["a"]


def test_resuming_keeps_the_history_and_numbering() -> None:
    earlier = AttemptRecord(provider="a", index=0, attempt=1, outcome="failed", error_type="timeout")
    listener = ChainRecorder()
    run = make_run([scripted("a"), scripted("b")], listener, RecordingWait(), start_index=1, attempts=[earlier])
    outcome = run.execute()
    assert outcome.succeeded_index == 1
    assert [(r.provider, r.attempt) for r in run.attempts] == [("a", 1), ("b", 2)]
    assert {attempt for _p, attempt, _c in listener.chunks} == {2}
    assert run.meta(outcome)["failed_chat_generators"] == ["a"]


# --- Messages v2: capabilities and checked structured output -----------------------------------

TOOLS = [ToolDefinition.model_validate({"type": "function", "function": {"name": "get_weather"}})]
PNG = (
    "data:image/png;base64,"
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAfbLI3wAAAABJRU5ErkJggg=="
)
IMAGE_MESSAGE = ChatMessage.model_validate(
    {
        "role": "user",
        "content": [{"type": "text", "text": "what is it?"}, {"type": "image_url", "image_url": {"url": PNG}}],
    }
)
CITY_SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "city",
        "schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


class Replies(ChatProvider):
    """Answers with fixed replies, one per choice (no chunks)."""

    def __init__(self, provider_id: str, *texts: str) -> None:
        super().__init__(provider_id, ScriptedConfig(text="unused"))
        self.texts = texts
        self.calls: list[ProviderCall] = []

    def run(self, call: ProviderCall, on_chunk: OnChunk) -> list[AssistantReply]:
        self.calls.append(call)
        return [
            AssistantReply(content=text, meta=ReplyMeta(model="fixed", index=index))
            for index, text in enumerate(self.texts)
        ]


@pytest.mark.parametrize(
    ("need", "lacking", "kw"),
    [
        ("tools", "supports_tools", {"tools": TOOLS}),
        ("images", "supports_images", {"messages": [IMAGE_MESSAGE]}),
        ("json_schema", "supports_json_schema", {"generation_kwargs": {"response_format": CITY_SCHEMA}}),
        ("n > 1", "supports_n", {"generation_kwargs": {"n": 2}}),
    ],
)
def test_a_provider_lacking_what_the_request_needs_is_skipped(need: str, lacking: str, kw: dict[str, Any]) -> None:
    gate, listener = Cooldowns(set()), ChainRecorder()
    providers = [scripted("a", **{lacking: False}), scripted("b", text='{"city": "Paris"}')]
    run = make_run(providers, listener, RecordingWait(), cooldowns=gate, **kw)

    outcome = run.execute()

    assert outcome.succeeded_index == 1
    assert outcomes(run) == [("a", "skipped", "unsupported"), ("b", "succeeded", None)]
    assert run.attempts[0].error_message == f"a does not take {need}"
    assert listener.failed == [] and gate.failures == []  # never a failure, never a cooldown
    assert run.meta(outcome)["total_attempts"] == 1
    assert run.meta(outcome)["failed_chat_generators"] == []


def test_a_conversation_with_tool_calls_needs_tools_even_without_tool_definitions() -> None:
    history = [
        ChatMessage(role="user", content="weather?"),
        ChatMessage.model_validate(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c1", "function": {"name": "get_weather", "arguments": "{}"}}],
            }
        ),
        ChatMessage(role="tool", tool_call_id="c1", content="21 C"),
    ]
    run = make_run(
        [scripted("a", supports_tools=False), scripted("b")], ChainRecorder(), RecordingWait(), messages=history
    )
    assert run.execute().succeeded_index == 1
    assert outcomes(run)[0] == ("a", "skipped", "unsupported")


def test_no_provider_able_to_take_the_request_ends_unsupported() -> None:
    providers = [scripted("a", supports_tools=False), scripted("b", supports_tools=False, supports_images=False)]
    run = make_run(providers, ChainRecorder(), RecordingWait(), tools=TOOLS, messages=[IMAGE_MESSAGE])

    outcome = run.execute()

    assert outcome.error is not None and outcome.error.type == "unsupported"
    assert "a does not take tools" in outcome.error.message
    assert "b does not take tools, images" in outcome.error.message
    assert outcomes(run) == [("a", "skipped", "unsupported"), ("b", "skipped", "unsupported")]


def test_unsupported_and_cooling_down_together_is_not_unsupported() -> None:
    providers = [scripted("a", supports_tools=False), scripted("b")]
    run = make_run(providers, ChainRecorder(), RecordingWait(), tools=TOOLS, cooldowns=Cooldowns({"b"}))
    outcome = run.execute()
    assert outcome.error is not None and outcome.error.type == "all_providers_failed"
    assert outcomes(run) == [("a", "skipped", "unsupported"), ("b", "skipped", "provider_unavailable")]


def test_a_provider_on_another_queue_that_cannot_take_the_request_is_skipped_not_handed_off() -> None:
    providers = [scripted("gpu", queue="chat.gpu", supports_tools=False), scripted("b")]
    run = make_run(providers, ChainRecorder(), RecordingWait(), tools=TOOLS, local_queues=frozenset({"chat"}))
    outcome = run.execute()
    assert outcome.handoff_index is None and outcome.succeeded_index == 1


def test_the_call_carries_the_tools_and_takes_response_format_and_n_out_of_the_kwargs() -> None:
    provider = Replies("a", '{"city": "Paris"}', '{"city": "Lyon"}')
    run = make_run(
        [provider],
        ChainRecorder(),
        RecordingWait(),
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        generation_kwargs={"response_format": CITY_SCHEMA, "n": 2, "temperature": 0.5},
    )
    assert run.execute().succeeded_index == 0
    (call,) = provider.calls
    assert (call.tools, call.tool_choice, call.parallel_tool_calls) == (TOOLS, "required", False)
    assert call.generation_kwargs == {"temperature": 0.5}
    assert call.n == call.choices == 2
    assert call.response_format is not None and call.response_format.json_schema is not None
    assert call.response_format.json_schema.name == "city"


@pytest.mark.parametrize(
    ("response_format", "answer"),
    [
        (CITY_SCHEMA, "Paris is the capital."),  # not JSON
        (CITY_SCHEMA, '{"town": "Paris"}'),  # JSON, not valid against the schema
        (CITY_SCHEMA, '{"city": 75}'),
        ({"type": "json_object"}, '["Paris"]'),  # JSON, not an object
        ({"type": "json_object"}, '{"city": "Par'),  # cut short
    ],
)
def test_an_answer_failing_its_response_format_falls_back_without_retry(
    response_format: dict[str, Any], answer: str
) -> None:
    gate, listener = Cooldowns(set()), ChainRecorder()
    providers = [scripted("a", text=answer, max_retries=2), scripted("b", text='{"city": "Paris"}')]
    run = make_run(
        providers, listener, RecordingWait(), cooldowns=gate, generation_kwargs={"response_format": response_format}
    )

    outcome = run.execute()

    assert outcome.succeeded_index == 1
    assert outcomes(run) == [("a", "failed", "invalid_output"), ("b", "succeeded", None)]
    assert [record.error_type for record in listener.failed] == ["invalid_output"]  # a fallback event: void its text
    assert listener.text_of(1) == answer  # what the listener must void
    assert run.attempts[0].chunks > 0
    assert gate.failures == []
    assert outcome.replies[0].content == '{"city": "Paris"}'


def test_every_choice_is_checked() -> None:
    run = make_run(
        [Replies("a", '{"city": "Paris"}', "Lyon"), Replies("b", '{"city": "Lyon"}')],
        ChainRecorder(),
        RecordingWait(),
        generation_kwargs={"response_format": CITY_SCHEMA, "n": 2},
    )
    outcome = run.execute()
    assert outcome.succeeded_index == 1
    assert run.attempts[0].error_message is not None and "reply 1" in run.attempts[0].error_message


def test_a_valid_answer_and_a_tool_call_pass_the_check() -> None:
    caller = scripted("a", tool_calls=[{"name": "get_weather", "arguments": "{}"}])
    run = make_run(
        [caller], ChainRecorder(), RecordingWait(), tools=TOOLS, generation_kwargs={"response_format": CITY_SCHEMA}
    )
    outcome = run.execute()
    assert outcome.succeeded_index == 0
    assert outcome.replies[0].tool_calls is not None
    run = make_run(
        [scripted("a", text='{"city": "Paris", "extra": 1}')],
        ChainRecorder(),
        RecordingWait(),
        generation_kwargs={"response_format": {"type": "json_object"}},
    )
    assert run.execute().succeeded_index == 0


def test_a_run_that_succeeds_is_freed_without_the_garbage_collector() -> None:
    listener, wait = ChainRecorder(), RecordingWait()
    run = make_run([scripted("a"), scripted("b")], listener, wait)
    freed = weakref.ref(run)
    gc.disable()
    try:
        assert run.execute().succeeded_index == 0
        del run
        assert freed() is None  # reference counting alone freed it: no cycle holds it
    finally:
        gc.enable()
