"""RequestRunner (tasks/runner.py) on a WorkerRuntime over fakeredis (``build_runtime``)."""

from __future__ import annotations

import time
from typing import Any

import fakeredis
import pytest

from providers import errors, registry
from providers.base import ChatProvider, OnChunk, ProviderCall, StreamingChunk
from settings import ProviderConfigBase, ScriptedConfig, Settings
from tasks.contract import keys
from tasks.contract.schemas import AssistantReply, ChatReply, ChatRequest, HandOff, StreamEvent
from tasks.runner import RequestRunner, TaskContext
from worker.runtime import WorkerRuntime, build_runtime
from worker.state.lease import LeaseLost
from worker.state.publisher import EventPublisher

TEXT = "The quick brown fox"
RID = "run-1"


def runtime_for(client: fakeredis.FakeRedis, providers: dict[str, dict[str, Any]], chain: list[str]) -> WorkerRuntime:
    configs = {
        pid: ScriptedConfig(**{"text": TEXT, "chunk_size": 5, "backoff_initial_s": 0.01, **entry})
        for pid, entry in providers.items()
    }
    # One event per provider chunk (coalescing, on by default, has tests of its own).
    settings = Settings(providers=configs, chains={"default": chain}, coalesce_ms=0)
    return build_runtime(settings, client, worker_name="unit-worker")


def run_request(runtime: WorkerRuntime, **fields: Any) -> ChatReply:
    request = ChatRequest.model_validate({"request_id": RID, "prompt": "say it", **fields})
    context = TaskContext(
        task_id=RID, queue="chat", submitted_at=time.time(), started_at_wall=time.time(), started_at=time.monotonic()
    )
    reply = RequestRunner(runtime, request, context).run()
    assert isinstance(reply, ChatReply)
    return reply


def events(client: fakeredis.FakeRedis) -> list[StreamEvent]:
    entries = client.xrange(keys.events_stream(RID))
    return [StreamEvent.model_validate_json(fields[b"event"]) for _id, fields in entries]


def stored(runtime: WorkerRuntime) -> ChatReply | None:
    return runtime.replies.get(RID)


def assert_well_formed(stream: list[StreamEvent]) -> None:
    """seq from 0 without gaps, one start first, exactly one terminal event, last."""
    assert [e.seq for e in stream] == list(range(len(stream)))
    assert stream[0].type == "start"
    assert [e.is_terminal for e in stream].count(True) == 1
    assert stream[-1].is_terminal


def test_success_streams_chunks_and_stores_the_reply(fake_redis: fakeredis.FakeRedis) -> None:
    runtime = runtime_for(fake_redis, {"steady": {}}, ["steady"])
    reply = run_request(runtime, metadata={"trace": "t-9"})
    stream = events(fake_redis)
    assert_well_formed(stream)
    assert [e.type for e in stream] == ["start", "chunk", "chunk", "chunk", "chunk", "done"]
    assert stream[0].chain == "default" and stream[0].worker == "unit-worker"
    assert "".join(e.delta or "" for e in stream if e.type == "chunk") == TEXT
    assert {(e.provider, e.attempt) for e in stream if e.type == "chunk"} == {("steady", 1)}
    assert reply.status == "succeeded" and reply.error is None
    assert reply.replies[0].content == TEXT
    assert reply.metadata == {"trace": "t-9"}
    assert reply.meta.provider == "steady" and reply.meta.chain == "default"
    assert reply.meta.worker == "unit-worker"
    assert reply.meta.total_attempts == 1 and reply.meta.successful_chat_generator_index == 0
    assert reply.meta.timings.total_ms is not None and reply.meta.timings.ttft_ms is not None
    assert reply.meta.timings.queued_ms is not None
    assert stored(runtime) == reply
    assert stream[-1].reply == reply


def test_a_stored_reply_short_circuits(fake_redis: fakeredis.FakeRedis) -> None:
    runtime = runtime_for(fake_redis, {"steady": {}}, ["steady"])
    earlier = ChatReply(request_id=RID, status="succeeded", metadata={"from": "earlier"})
    fake_redis.set(keys.reply_key(RID), earlier.model_dump_json())
    assert run_request(runtime) == earlier
    assert events(fake_redis) == []
    assert stored(runtime) == earlier


def test_cut_stream_falls_back_with_a_fallback_event(fake_redis: fakeredis.FakeRedis) -> None:
    runtime = runtime_for(fake_redis, {"cut": {"fail": "cut", "fail_after_chunks": 2}, "steady": {}}, ["cut", "steady"])
    reply = run_request(runtime)
    stream = events(fake_redis)
    assert_well_formed(stream)
    assert [(e.type, e.provider, e.attempt) for e in stream[:5]] == [
        ("start", None, None),
        ("chunk", "cut", 1),
        ("chunk", "cut", 1),
        ("fallback", "cut", 1),
        ("chunk", "steady", 2),
    ]
    assert stream[3].error_type == "stream_interrupted"
    # A subscriber that discards the deltas of the failed attempt sees exactly the reply.
    kept = "".join(e.delta or "" for e in stream if e.type == "chunk" and e.attempt != 1)
    assert kept == TEXT == reply.replies[0].content
    assert reply.status == "succeeded"
    assert [(a.provider, a.outcome) for a in reply.meta.attempts] == [("cut", "failed"), ("steady", "succeeded")]
    assert reply.meta.failed_chat_generators == ["cut"]


def test_cancel_before_the_run(fake_redis: fakeredis.FakeRedis) -> None:
    runtime = runtime_for(fake_redis, {"steady": {}}, ["steady"])
    fake_redis.set(keys.cancel_key(RID), "1")
    reply = run_request(runtime)
    stream = events(fake_redis)
    assert_well_formed(stream)
    assert [e.type for e in stream] == ["start", "cancelled"]
    assert reply.status == "cancelled"
    assert reply.error is not None and reply.error.type == "cancelled"
    assert reply.replies == [] and reply.meta.attempts == []
    assert stored(runtime) == reply


class CancelAfterFirstChunk(ChatProvider):
    """Streams chunks, setting the request's cancel key after the first one."""

    def __init__(self, client: fakeredis.FakeRedis) -> None:
        super().__init__("canceller", ScriptedConfig(text="x"))
        self._client = client
        self.sent = 0

    def run(self, call: ProviderCall, on_chunk: OnChunk) -> list[AssistantReply]:
        for piece in ("one ", "two ", "three ", "four"):
            on_chunk(StreamingChunk(content=piece))
            self.sent += 1
            if self.sent == 1:
                self._client.set(keys.cancel_key(RID), "1")
        raise AssertionError("the runner should have stopped the stream")


class FixedPool:
    """Stands in for ProviderPool with ready-made providers."""

    def __init__(self, *providers: ChatProvider) -> None:
        self._providers = list(providers)

    def chain(self, _ids: list[str]) -> list[ChatProvider]:
        return self._providers


def test_cancel_mid_stream_stops_at_the_next_chunk(fake_redis: fakeredis.FakeRedis) -> None:
    runtime = runtime_for(fake_redis, {"steady": {}}, ["steady"])
    canceller = CancelAfterFirstChunk(fake_redis)
    runtime.providers = FixedPool(canceller, runtime.providers.get("steady"))  # type: ignore[assignment]
    reply = run_request(runtime)
    stream = events(fake_redis)
    assert_well_formed(stream)
    assert [e.type for e in stream] == ["start", "chunk", "chunk", "cancelled"]
    assert canceller.sent == 1
    assert reply.status == "cancelled"
    assert [(a.provider, a.outcome, a.error_type) for a in reply.meta.attempts] == [
        ("canceller", "stopped", "cancelled")
    ]


def test_stream_false_sends_no_chunks(fake_redis: fakeredis.FakeRedis) -> None:
    runtime = runtime_for(fake_redis, {"steady": {}}, ["steady"])
    reply = run_request(runtime, stream=False)
    assert [e.type for e in events(fake_redis)] == ["start", "done"]
    assert reply.status == "succeeded"
    assert reply.replies[0].content == TEXT


def test_deadline_exceeded(fake_redis: fakeredis.FakeRedis) -> None:
    runtime = runtime_for(fake_redis, {"slow": {"first_chunk_delay_ms": 30_000}, "steady": {}}, ["slow", "steady"])
    reply = run_request(runtime, timeout_s=0.2)
    stream = events(fake_redis)
    assert_well_formed(stream)
    assert [e.type for e in stream] == ["start", "error"]
    assert reply.status == "failed"
    assert reply.error is not None and reply.error.type == "deadline_exceeded"
    assert stream[-1].error == reply.error
    assert [(a.provider, a.outcome) for a in reply.meta.attempts] == [("slow", "stopped")]


def test_every_provider_failing(fake_redis: fakeredis.FakeRedis) -> None:
    providers = {"a": {"fail": "auth"}, "b": {"fail": "server_error", "max_retries": 1}}
    runtime = runtime_for(fake_redis, providers, ["a", "b"])
    reply = run_request(runtime)
    stream = events(fake_redis)
    assert_well_formed(stream)
    assert [e.type for e in stream] == ["start", "fallback", "fallback", "fallback", "error"]
    assert reply.status == "failed"
    assert reply.error is not None and reply.error.type == "all_providers_failed"
    assert [a.error_type for a in reply.meta.attempts] == ["auth", "server_error", "server_error"]
    assert reply.meta.provider is None


def test_transient_failure_is_retried_on_the_same_provider(fake_redis: fakeredis.FakeRedis) -> None:
    runtime = runtime_for(fake_redis, {"flaky": {"fail": "overloaded", "fail_times": 1}, "b": {}}, ["flaky", "b"])
    reply = run_request(runtime)
    assert reply.status == "succeeded" and reply.meta.provider == "flaky"
    assert [e.type for e in events(fake_redis)][:3] == ["start", "fallback", "chunk"]
    assert reply.meta.total_attempts == 2


class Broken(ChatProvider):
    """A provider with a bug: raises outside the taxonomy."""

    def run(self, call: ProviderCall, on_chunk: OnChunk) -> list[AssistantReply]:
        raise KeyError("oops")


def test_an_internal_error_still_ends_the_request(fake_redis: fakeredis.FakeRedis) -> None:
    runtime = runtime_for(fake_redis, {"steady": {}}, ["steady"])
    runtime.providers = FixedPool(Broken("broken", ScriptedConfig(text="x")))  # type: ignore[assignment]
    reply = run_request(runtime)
    assert reply.status == "failed"
    assert reply.error is not None and reply.error.type == "internal_error"
    assert "oops" not in reply.error.message
    assert [e.type for e in events(fake_redis)] == ["start", "error"]
    assert stored(runtime) == reply


def test_a_redelivered_request_continues_the_seq(fake_redis: fakeredis.FakeRedis) -> None:
    runtime = runtime_for(fake_redis, {"steady": {}}, ["steady"])
    crashed = EventPublisher(fake_redis, RID, store=runtime.replies, events_maxlen=100, events_ttl_s=60)
    crashed.emit("start")
    crashed.emit("chunk", delta="lost", provider="steady", attempt=1)
    reply = run_request(runtime)
    stream = events(fake_redis)
    assert [e.seq for e in stream] == list(range(len(stream)))
    assert [e.type for e in stream].count("start") == 1  # the rerun continues, it does not restart
    lost = stream[2]
    assert (lost.type, lost.provider, lost.attempt, lost.error_type) == ("fallback", "steady", 1, "worker_lost")
    assert {e.attempt for e in stream[3:] if e.type == "chunk"} == {2}
    assert [e.is_terminal for e in stream].count(True) == 1
    assert reply.status == "succeeded"
    assert [(a.provider, a.attempt, a.outcome, a.error_type, a.chunks) for a in reply.meta.attempts] == [
        ("steady", 1, "failed", "worker_lost", 1),
        ("steady", 2, "succeeded", None, reply.meta.attempts[1].chunks),
    ]
    kept = "".join(e.delta or "" for e in stream if e.type == "chunk" and e.attempt != 1)
    assert kept == reply.replies[0].content


@pytest.mark.parametrize("timeout_s", [None, 10_000.0])
def test_timeout_is_capped_by_settings(fake_redis: fakeredis.FakeRedis, timeout_s: float | None) -> None:
    runtime = runtime_for(fake_redis, {"steady": {}}, ["steady"])
    request = ChatRequest.model_validate({"request_id": RID, "prompt": "x", "timeout_s": timeout_s})
    runner = RequestRunner(runtime, request, TaskContext(task_id=RID, queue="chat", started_at=100.0))
    expected = runtime.settings.default_timeout_s if timeout_s is None else runtime.settings.max_timeout_s
    assert runner.deadline == pytest.approx(100.0 + expected)


def test_a_hand_off_s_deadline_is_capped_by_settings(fake_redis: fakeredis.FakeRedis) -> None:
    runtime = runtime_for(fake_redis, {"steady": {}}, ["steady"])
    request = ChatRequest.model_validate({"request_id": RID, "prompt": "x"})
    handoff = HandOff(start_index=0, next_seq=1, queue_hops=1, deadline_at=10.0**12, started_at=0.0)
    context = TaskContext(task_id=RID, queue="chat", started_at_wall=1_000.0, started_at=100.0)
    runner = RequestRunner(runtime, request, context, handoff=handoff)
    assert runner.deadline_at == pytest.approx(1_000.0 + runtime.settings.max_timeout_s)
    assert runner.deadline == pytest.approx(100.0 + runtime.settings.max_timeout_s)


def test_a_long_answer_replays_from_its_start_event_with_a_small_maxlen(fake_redis: fakeredis.FakeRedis) -> None:
    text = "word " * 400
    configs = {"steady": ScriptedConfig(text=text, chunk_size=1)}
    settings = Settings(providers=configs, chains={"default": ["steady"]}, coalesce_ms=0, events_maxlen=20)
    runtime = build_runtime(settings, fake_redis, worker_name="unit-worker")
    reply = run_request(runtime)
    stream = events(fake_redis)
    assert len(stream) <= 20
    assert_well_formed(stream)
    assert "".join(e.delta or "" for e in stream if e.type == "chunk") == text == reply.replies[0].content


def test_a_provider_that_cannot_be_built_still_ends_the_request(
    fake_redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Providers are built lazily, inside the chain's run, so a build that blows up is caught
    # by the runner and still ends the stream with an error and a stored reply.
    def explode(provider_id: str, config: object) -> ChatProvider:
        raise RuntimeError("could not build provider")

    monkeypatch.setattr(registry, "build_provider", explode)
    runtime = runtime_for(fake_redis, {"steady": {}}, ["steady"])
    reply = run_request(runtime)
    assert reply.status == "failed"
    assert reply.error is not None and reply.error.type == "internal_error"
    assert events(fake_redis)[-1].type == "error"


def test_a_provider_that_is_unavailable_falls_through(
    fake_redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_build = registry.build_provider

    def build(provider_id: str, config: ProviderConfigBase) -> ChatProvider:
        if provider_id == "broken":
            raise errors.ProviderUnavailable("cannot load model 'x' from /nowhere")
        return real_build(provider_id, config)

    monkeypatch.setattr(registry, "build_provider", build)
    runtime = runtime_for(fake_redis, {"broken": {}, "steady": {}}, ["broken", "steady"])
    reply = run_request(runtime)
    assert reply.status == "succeeded"
    assert [(a.provider, a.outcome, a.error_type) for a in reply.meta.attempts] == [
        ("broken", "failed", "provider_unavailable"),
        ("steady", "succeeded", None),
    ]


class TakenOverMidStream(ChatProvider):
    """Streams one chunk, then another worker takes the request's lease over."""

    def __init__(self, client: fakeredis.FakeRedis) -> None:
        super().__init__("taken", ScriptedConfig(text="x"))
        self._client = client
        self.calls = 0

    def run(self, call: ProviderCall, on_chunk: OnChunk) -> list[AssistantReply]:
        self.calls += 1
        on_chunk(StreamingChunk(content="one "))
        self._client.set(keys.lease_key(RID), "other-worker:token")
        on_chunk(StreamingChunk(content="two"))
        raise AssertionError("the runner should have stopped the stream")


def test_a_lease_taken_over_stops_the_run_without_a_fallback_or_a_reply(fake_redis: fakeredis.FakeRedis) -> None:
    runtime = runtime_for(fake_redis, {"steady": {}}, ["steady"])
    taken = TakenOverMidStream(fake_redis)
    steady = runtime.providers.get("steady")
    runtime.providers = FixedPool(taken, steady)  # type: ignore[assignment]
    request = ChatRequest.model_validate({"request_id": RID, "prompt": "say it"})
    with pytest.raises(LeaseLost):
        RequestRunner(runtime, request, TaskContext(task_id=RID, queue="chat")).run()
    assert taken.calls == 1  # not retried, and the chain did not fall back to the next provider
    assert [e.type for e in events(fake_redis)] == ["start", "chunk"]
    assert stored(runtime) is None
    assert fake_redis.get(keys.lease_key(RID)) == b"other-worker:token"  # the new owner's lease stands
