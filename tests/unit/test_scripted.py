"""The scripted provider: deterministic chunks, pacing through ``call.wait``, every failure kind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from providers import errors
from providers.base import ProviderCall, StreamingChunk
from providers.scripted import CRASH_EXIT_CODE, ScriptedProvider
from settings import ScriptedConfig
from tasks.contract.schemas import ChatMessage, ToolDefinition
from tests.support.calls import ChunkCollector, make_call, provider_factory

TEXT = "Natural Language Processing"  # 27 characters


class RecordingWait:
    """Stands in for ``time.sleep``: records each requested sleep and returns at once."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


provider = provider_factory("scripted-test", ScriptedConfig, ScriptedProvider, text=TEXT)


def call(
    wait: RecordingWait | None = None,
    *,
    attempt: int = 1,
    deadline_s: float = 60.0,
    **generation_kwargs: Any,
) -> ProviderCall:
    return make_call(
        messages=[ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content="what is NLP")],
        deadline_s=deadline_s,
        attempt=attempt,
        wait=wait or RecordingWait(),
        **generation_kwargs,
    )


def test_replays_text_in_chunks_of_chunk_size() -> None:
    sink = ChunkCollector()
    replies = provider(chunk_size=4).run(call(), sink)
    assert [c.content for c in sink.chunks] == ["Natu", "ral ", "Lang", "uage", " Pro", "cess", "ing"]
    assert sink.text == TEXT
    assert len(replies) == 1
    reply = replies[0]
    assert reply.role == "assistant"
    assert reply.content == TEXT
    assert reply.meta.finish_reason == "stop"
    assert reply.meta.model == "scripted"
    assert reply.meta.completion_start_time is not None


def test_only_the_last_chunk_carries_the_finish_reason() -> None:
    sink = ChunkCollector()
    provider(chunk_size=10, model="fake-model").run(call(), sink)
    assert [c.meta["finish_reason"] for c in sink.chunks] == [None, None, "stop"]
    assert {c.meta["model"] for c in sink.chunks} == {"fake-model"}


@pytest.mark.parametrize("chunk_size", [1, 5, 27, 100])
def test_chunks_reassemble_the_text(chunk_size: int) -> None:
    sink = ChunkCollector()
    provider(chunk_size=chunk_size).run(call(), sink)
    assert sink.text == TEXT
    assert all(1 <= len(c.content) <= chunk_size for c in sink.chunks)
    assert len(sink.chunks) == -(-len(TEXT) // chunk_size)


def test_max_tokens_truncates_with_finish_reason_length() -> None:
    sink = ChunkCollector()
    replies = provider(chunk_size=4).run(call(max_tokens=2), sink)
    assert replies[0].content == "Natural "
    assert replies[0].meta.finish_reason == "length"
    assert replies[0].meta.usage.completion_tokens == 2
    assert len(sink.chunks) == 2
    assert sink.chunks[-1].meta["finish_reason"] == "length"


def test_max_tokens_at_or_above_the_text_is_a_normal_stop() -> None:
    replies = provider(chunk_size=4).run(call(max_tokens=7), ChunkCollector())
    assert replies[0].meta.finish_reason == "stop"
    assert replies[0].content == TEXT


def test_usage_counts() -> None:
    usage = provider(chunk_size=4).run(call(), ChunkCollector())[0].meta.usage
    assert usage.prompt_tokens == 5  # "be brief" + "what is NLP", counted in words
    assert usage.completion_tokens == 7  # one token per chunk
    assert usage.total_tokens == 12


def test_pacing_goes_through_call_wait() -> None:
    wait = RecordingWait()
    provider(chunk_size=9, first_chunk_delay_ms=200, chunk_delay_ms=50).run(call(wait), ChunkCollector())
    assert wait.calls == pytest.approx([0.2, 0.05, 0.05])


def test_no_delay_means_no_wait() -> None:
    wait = RecordingWait()
    provider().run(call(wait), ChunkCollector())
    assert wait.calls == []


@pytest.mark.parametrize(
    ("kind", "error_class"),
    [
        ("rate_limit", errors.RateLimited),
        ("timeout", errors.ProviderTimeout),
        ("server_error", errors.ServerError),
        ("overloaded", errors.Overloaded),
        ("connection_error", errors.ProviderConnectionError),
        ("auth", errors.AuthenticationFailed),
        ("unknown_model", errors.UnknownModel),
        ("context_length", errors.ContextLengthExceeded),
        ("content_filter", errors.ContentFiltered),
        ("bad_request", errors.BadProviderRequest),
    ],
)
def test_each_failure_kind_raises_its_error_before_any_chunk(kind: str, error_class: type[Exception]) -> None:
    sink = ChunkCollector()
    with pytest.raises(error_class) as info:
        provider(fail=kind).run(call(), sink)
    assert type(info.value) is error_class
    assert sink.chunks == []
    assert "scripted-test" in str(info.value)


def test_rate_limit_carries_retry_after() -> None:
    with pytest.raises(errors.RateLimited) as info:
        provider(fail="rate_limit", retry_after_s=2.5).run(call(), ChunkCollector())
    assert info.value.retry_after_s == 2.5
    assert info.value.code == "rate_limited"


def test_server_error_is_a_503() -> None:
    with pytest.raises(errors.ServerError) as info:
        provider(fail="server_error").run(call(), ChunkCollector())
    assert info.value.status_code == 503
    assert isinstance(info.value, errors.TransientError)


def test_fail_delay_is_waited_before_failing() -> None:
    wait = RecordingWait()
    with pytest.raises(errors.Overloaded):
        provider(fail="overloaded", fail_delay_ms=300).run(call(wait), ChunkCollector())
    assert wait.calls == pytest.approx([0.3])


@pytest.mark.parametrize("after", [0, 1, 3, 6])
def test_cut_after_exactly_fail_after_chunks(after: int) -> None:
    sink = ChunkCollector()
    with pytest.raises(errors.StreamInterrupted):
        provider(chunk_size=4, fail="cut", fail_after_chunks=after).run(call(), sink)
    assert len(sink.chunks) == after
    assert sink.text == TEXT[: 4 * after]


def test_cut_beyond_the_text_streams_everything_then_fails() -> None:
    sink = ChunkCollector()
    with pytest.raises(errors.StreamInterrupted):
        provider(chunk_size=4, fail="cut", fail_after_chunks=50).run(call(), sink)
    assert sink.text == TEXT


@pytest.mark.parametrize("kind", ["server_error", "cut"])
def test_fail_times_fails_only_the_first_calls(kind: str) -> None:
    scripted = provider(fail=kind, fail_times=2, fail_after_chunks=1)
    for attempt in (1, 2):
        with pytest.raises(errors.ProviderError):
            scripted.run(call(attempt=attempt), ChunkCollector())
    sink = ChunkCollector()
    assert scripted.run(call(attempt=3), sink)[0].content == TEXT
    assert sink.text == TEXT


def test_fail_times_zero_never_fails() -> None:
    assert provider(fail="auth", fail_times=0).run(call(), ChunkCollector())[0].content == TEXT


def test_first_chunk_timeout_shorter_than_the_delay() -> None:
    wait = RecordingWait()
    sink = ChunkCollector()
    with pytest.raises(errors.ProviderTimeout):
        provider(first_chunk_delay_ms=5_000, first_chunk_timeout_s=0.5).run(call(wait), sink)
    assert sink.chunks == []
    assert len(wait.calls) == 1
    assert 0 <= wait.calls[0] <= 0.5  # it waited out its own timeout, not the whole delay


def test_first_chunk_timeout_longer_than_the_delay_succeeds() -> None:
    wait = RecordingWait()
    replies = provider(first_chunk_delay_ms=100, first_chunk_timeout_s=1.0).run(call(wait), ChunkCollector())
    assert replies[0].content == TEXT
    assert wait.calls == pytest.approx([0.1])


def test_whole_call_timeout() -> None:
    wait = RecordingWait()
    with pytest.raises(errors.ProviderTimeout):
        provider(first_chunk_delay_ms=3_000, timeout_s=1.0).run(call(wait), ChunkCollector())
    assert wait.calls and wait.calls[0] <= 1.0


def test_request_deadline_bounds_the_wait() -> None:
    wait = RecordingWait()
    with pytest.raises(errors.ProviderTimeout):
        provider(first_chunk_delay_ms=10_000).run(call(wait, deadline_s=0.2), ChunkCollector())
    # It waits until the deadline (so the request's own deadline fires first), never the full delay.
    assert sum(wait.calls) <= 0.2 + 0.01 + 1e-6
    assert max(wait.calls) < 10


def test_exceptions_from_on_chunk_propagate_unchanged() -> None:
    def cancel(_chunk: StreamingChunk) -> None:
        raise errors.Cancelled("stop")

    with pytest.raises(errors.Cancelled):
        provider().run(call(), cancel)


def test_a_stop_raised_by_wait_propagates() -> None:
    def deadline(_seconds: float) -> None:
        raise errors.DeadlineExceeded("late")

    sink = ChunkCollector()
    scripted = provider(first_chunk_delay_ms=100)
    with pytest.raises(errors.DeadlineExceeded):
        scripted.run(ProviderCall(messages=[], generation_kwargs={}, stream=True, deadline=1e12, wait=deadline), sink)
    assert sink.chunks == []


@given(text=st.text(min_size=1, max_size=200), chunk_size=st.integers(1, 50), max_tokens=st.none() | st.integers(1, 60))
@settings(max_examples=100, deadline=None)
def test_chunks_always_reassemble_into_the_reply(text: str, chunk_size: int, max_tokens: int | None) -> None:
    sink = ChunkCollector()
    kwargs = {} if max_tokens is None else {"max_tokens": max_tokens}
    reply = provider(text=text, chunk_size=chunk_size).run(call(**kwargs), sink)[0]
    assert sink.text == reply.content
    assert text.startswith(reply.content)
    assert reply.meta.usage.completion_tokens == len(sink.chunks)
    assert (reply.content == text) == (reply.meta.finish_reason == "stop")


# A child process that runs the scripted provider told to crash, printing each chunk it hands on.
_CRASHING = """
import sys
from providers.scripted import ScriptedProvider
from settings import ScriptedConfig
from tests.support.calls import make_call

config = ScriptedConfig(text="abcdefgh", chunk_size=2, fail="crash", fail_after_chunks=int(sys.argv[1]))
ScriptedProvider("crashing", config).run(make_call(), lambda chunk: print(chunk.content, flush=True))
print("returned", flush=True)
"""


@pytest.mark.parametrize(("after", "streamed"), [(0, []), (2, ["ab", "cd"]), (9, ["ab", "cd", "ef", "gh"])])
def test_crash_ends_the_process_mid_call(after: int, streamed: list[str]) -> None:
    """``fail = "crash"``: the process exits at once (``os._exit``), after ``fail_after_chunks``
    chunks, the way an OOM kill or a segfault ends a pool process: no exception, no return."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", _CRASHING, str(after)], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == CRASH_EXIT_CODE, done.stderr
    assert done.stdout.splitlines() == streamed
    assert "Traceback" not in done.stderr


def test_crash_is_a_failure_kind_of_the_config() -> None:
    assert ScriptedConfig(text="x", fail="crash").fail == "crash"


# --- Messages v2: tool calls and several choices ---------------------------------------------

WEATHER_TOOL = ToolDefinition.model_validate(
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
)
CALLS = [
    {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    {"name": "get_time", "arguments": {"tz": "CET"}, "id": "call_fixed"},
]


def tool_call(messages: list[ChatMessage] | None = None, **fields: Any) -> ProviderCall:
    return ProviderCall(
        messages=messages or [ChatMessage(role="user", content="weather in Paris?")],
        generation_kwargs={},
        stream=True,
        deadline=1e12,
        wait=RecordingWait(),
        **{"tools": [WEATHER_TOOL], **fields},
    )


def test_tool_calls_stream_as_fragments_of_chunk_size() -> None:
    sink = ChunkCollector()
    (reply,) = provider(chunk_size=8, tool_calls=CALLS).run(tool_call(), sink)

    deltas = [chunk.tool_call for chunk in sink.chunks]
    assert all(delta is not None for delta in deltas) and sink.text == ""
    assert [(d.index, d.name, d.arguments_delta) for d in deltas if d is not None] == [
        (0, "get_weather", '{"city":'),
        (0, None, ' "Paris"'),
        (0, None, "}"),
        (1, "get_time", '{"tz": "'),
        (1, None, 'CET"}'),
    ]
    first_ids = [d.id for d in deltas if d is not None and d.name]
    assert first_ids[0] is not None and first_ids[0].startswith("call_") and first_ids[1] == "call_fixed"
    assert all(d.id is None for d in deltas if d is not None and d.name is None)
    assert reply.content is None and reply.meta.finish_reason == "tool_calls"
    assert reply.tool_calls is not None
    assert [(c.id, c.function.name, c.function.arguments) for c in reply.tool_calls] == [
        (first_ids[0], "get_weather", '{"city": "Paris"}'),
        ("call_fixed", "get_time", '{"tz": "CET"}'),
    ]
    # The reply is the next request's assistant message as it is.
    assert reply.to_message().tool_calls == reply.tool_calls


def test_the_turn_after_a_tool_result_and_a_request_without_tools_get_the_text() -> None:
    scripted = provider(tool_calls=CALLS[:1])
    (first,) = scripted.run(tool_call(), ChunkCollector())
    assert first.tool_calls is not None
    conversation = [
        ChatMessage(role="user", content="weather in Paris?"),
        first.to_message(),
        ChatMessage(role="tool", tool_call_id=first.tool_calls[0].id, content='{"temp_c": 21}'),
    ]
    (answer,) = scripted.run(tool_call(conversation), ChunkCollector())
    assert (answer.content, answer.tool_calls, answer.meta.finish_reason) == (TEXT, None, "stop")
    (plain,) = scripted.run(tool_call(tools=None), ChunkCollector())
    assert plain.content == TEXT
    (declined,) = scripted.run(tool_call(tool_choice="none"), ChunkCollector())
    assert declined.content == TEXT


def test_several_choices_stream_interleaved_under_their_index() -> None:
    sink = ChunkCollector()
    replies = provider(chunk_size=10).run(call(n=3), sink)

    assert [chunk.index for chunk in sink.chunks] == [0, 1, 2] * 3
    assert [(reply.meta.index, reply.content) for reply in replies] == [(0, TEXT), (1, TEXT), (2, TEXT)]
    assert all(reply.meta.usage.completion_tokens == 3 for reply in replies)
    assert [chunk.meta["finish_reason"] for chunk in sink.chunks[-3:]] == ["stop"] * 3


def test_several_choices_of_tool_calls_each_get_their_own_ids() -> None:
    sink = ChunkCollector()
    replies = provider(chunk_size=64, tool_calls=CALLS[:1]).run(tool_call(n=2), sink)

    assert [(chunk.index, chunk.tool_call is not None) for chunk in sink.chunks] == [(0, True), (1, True)]
    ids = [reply.tool_calls[0].id for reply in replies if reply.tool_calls]
    assert len(ids) == 2 and ids[0] != ids[1]
