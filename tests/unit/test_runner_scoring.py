"""Hallucination risk scoring in the run (tasks/runner.py, over fakeredis): after the winner
answers, a request with ``hallucination_score`` has its answer scored by that same provider,
the keys land in each reply's meta, nothing of the decision calls reaches the events, and
scoring that fails leaves the answer standing with ``hallucination_error``."""

from __future__ import annotations

import threading
import time
from typing import Any

import fakeredis
import pytest

from providers import errors, registry
from providers.base import ChatProvider, OnChunk, ProviderCall, StreamingChunk
from settings import ProviderConfigBase, ScriptedConfig, Settings
from settings.providers import OpenAIConfig
from tasks.contract import keys
from tasks.contract.schemas import AssistantReply, ChatReply, ChatRequest, ReplyMeta, StreamEvent, Usage
from tasks.runner import RequestRunner, TaskContext
from tests.support.stream_contract import assert_coherent
from worker.runtime import WorkerRuntime, build_runtime

RID = "scored-1"
ENTITY = '"The Old Man and the Sea"'
PROMPT = f"Who wrote {ENTITY} in 1952?"
ANSWER = "Ernest Hemingway wrote it."
DECISION_MARK = "Reply with exactly one word"


class Oracle(ChatProvider):
    """Streams ``ANSWER``; answers a decision prompt ANSWER while it still holds ``ENTITY`` and
    REFUSE once masked. Its decision replies also go to ``on_chunk``, as a streaming provider's
    would: the run must drop them."""

    def __init__(self, provider_id: str, config: ProviderConfigBase, *, fail: BaseException | None = None) -> None:
        super().__init__(provider_id, config)
        self.fail = fail
        self.decisions: list[ProviderCall] = []
        self._lock = threading.Lock()

    def run(self, call: ProviderCall, on_chunk: OnChunk) -> list[AssistantReply]:
        text = call.messages[-1].text()
        if DECISION_MARK not in text:
            for number in range(call.choices):
                for piece in ("Ernest ", "Hemingway ", "wrote it."):
                    on_chunk(StreamingChunk(content=piece, index=number))
            usage = Usage(prompt_tokens=9, completion_tokens=3, total_tokens=12)
            return [
                AssistantReply(content=ANSWER, meta=ReplyMeta(model="gpt-test", index=n, usage=usage))
                for n in range(call.choices)
            ]
        with self._lock:
            self.decisions.append(call)
        if self.fail is not None:
            raise self.fail
        decision = "ANSWER" if ENTITY in text else "REFUSE"
        on_chunk(StreamingChunk(content=decision))
        usage = Usage(prompt_tokens=20, completion_tokens=1, total_tokens=21)
        return [AssistantReply(content=decision, meta=ReplyMeta(model="gpt-test", usage=usage))]


def runtime_with(
    client: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch, oracle_type: str = "openai", **oracle: Any
) -> tuple[WorkerRuntime, list[Oracle]]:
    built: list[Oracle] = []

    def build(provider_id: str, config: ProviderConfigBase) -> ChatProvider:
        built.append(Oracle(provider_id, config, **oracle))
        return built[-1]

    monkeypatch.setattr(registry, "build_provider", build)
    config: ProviderConfigBase = OpenAIConfig(model="gpt-test") if oracle_type == "openai" else ScriptedConfig(text="x")
    settings = Settings(providers={"oracle": config}, chains={"default": ["oracle"]}, coalesce_ms=0)
    return build_runtime(settings, client, worker_name="unit-worker"), built


def run(runtime: WorkerRuntime, **fields: Any) -> ChatReply:
    request = ChatRequest.model_validate({"request_id": RID, "prompt": PROMPT, **fields})
    context = TaskContext(task_id=RID, queue="chat", started_at_wall=time.time(), started_at=time.monotonic())
    reply = RequestRunner(runtime, request, context).run()
    assert isinstance(reply, ChatReply)
    return reply


def events_of(client: fakeredis.FakeRedis) -> list[StreamEvent]:
    return [StreamEvent.model_validate_json(f[b"event"]) for _id, f in client.xrange(keys.events_stream(RID))]


def test_a_scored_answer_carries_the_three_keys_and_its_calls(
    fake_redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime, built = runtime_with(fake_redis, monkeypatch)
    reply = run(runtime, hallucination_score={"n_samples": 3, "m": 4, "skeleton_policy": "closed_book"})
    assert reply.status == "succeeded" and reply.replies[0].content == ANSWER
    meta = reply.replies[0].meta
    assert meta.hallucination_error is None
    assert meta.hallucination_decision in ("ANSWER", "REFUSE")
    assert meta.hallucination_risk is not None and 0 <= meta.hallucination_risk <= 1
    assert meta.hallucination_rationale
    assert meta.hallucination_scoring_calls == 3 * (4 + 1) == len(built[0].decisions)
    assert meta.hallucination_scoring_usage == Usage(prompt_tokens=300, completion_tokens=15, total_tokens=315)
    assert all(not call.stream for call in built[0].decisions)
    # The decisions went to on_chunk too, and none of them reached the stream.
    events = events_of(fake_redis)
    assert_coherent(events, reply, RID)
    assert "".join(e.delta or "" for e in events if e.type == "chunk") == ANSWER
    published = "".join(e.model_dump_json() for e in events if e.type != "done")
    assert "REFUSE" not in published and '"ANSWER' not in published


def test_every_choice_carries_the_same_score(fake_redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime, _built = runtime_with(fake_redis, monkeypatch)
    reply = run(runtime, generation_kwargs={"n": 2}, hallucination_score={"n_samples": 2, "m": 2})
    first, second = (answer.meta for answer in reply.replies)
    assert (first.index, second.index) == (0, 1)
    keys_of = ("hallucination_decision", "hallucination_risk", "hallucination_rationale", "hallucination_scoring_calls")
    assert [getattr(first, key) for key in keys_of] == [getattr(second, key) for key in keys_of]
    assert first.hallucination_scoring_calls == 6


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        pytest.param(errors.RateLimited("oracle: 429"), "a decision call failed: rate_limited", id="provider-error"),
        pytest.param(ValueError("a bug"), "scoring failed inside the worker (ValueError)", id="bug"),
    ],
)
def test_scoring_that_fails_leaves_the_answer_standing(
    fake_redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch, failure: BaseException, reason: str
) -> None:
    runtime, _built = runtime_with(fake_redis, monkeypatch, fail=failure)
    reply = run(runtime, hallucination_score={"n_samples": 1, "m": 1})
    assert reply.status == "succeeded" and reply.replies[0].content == ANSWER
    meta = reply.replies[0].meta
    assert meta.hallucination_error == reason
    assert meta.hallucination_decision is None and meta.hallucination_risk is None


def test_a_winner_that_cannot_be_scored_says_so(
    fake_redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime, built = runtime_with(fake_redis, monkeypatch, oracle_type="scripted")
    reply = run(runtime, hallucination_score={})
    assert reply.status == "succeeded"
    assert reply.replies[0].meta.hallucination_error == "provider type 'scripted' cannot be scored"
    assert reply.replies[0].meta.hallucination_scoring_calls == 0 and built[0].decisions == []


def test_a_request_without_the_option_is_not_scored(
    fake_redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime, built = runtime_with(fake_redis, monkeypatch)
    reply = run(runtime)
    assert built[0].decisions == []
    assert reply.replies[0].meta.hallucination_scoring_calls is None


class SlowDecisions(Oracle):
    """Decision calls that take until past the request's deadline."""

    def run(self, call: ProviderCall, on_chunk: OnChunk) -> list[AssistantReply]:
        if DECISION_MARK in call.messages[-1].text():
            time.sleep(min(2.0, max(0.0, call.deadline - time.monotonic()) + 0.1))
        return super().run(call, on_chunk)


def test_scoring_counts_toward_the_deadline(fake_redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "build_provider", lambda pid, config: SlowDecisions(pid, config))
    settings = Settings(providers={"oracle": OpenAIConfig(model="gpt-test")}, chains={"default": ["oracle"]})
    runtime = build_runtime(settings, fake_redis, worker_name="unit-worker")
    reply = run(runtime, timeout_s=0.5, hallucination_score={"n_samples": 1, "m": 1})
    assert reply.status == "succeeded" and reply.replies[0].content == ANSWER
    assert reply.replies[0].meta.hallucination_error == "the request's deadline passed before scoring finished"


class CountingDecisions(Oracle):
    """Decision calls that stay in flight a moment, counting how many overlap."""

    def __init__(self, provider_id: str, config: ProviderConfigBase) -> None:
        super().__init__(provider_id, config)
        self.in_flight = 0
        self.peak = 0

    def run(self, call: ProviderCall, on_chunk: OnChunk) -> list[AssistantReply]:
        if DECISION_MARK not in call.messages[-1].text():
            return super().run(call, on_chunk)
        with self._lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            time.sleep(0.01)
            return super().run(call, on_chunk)
        finally:
            with self._lock:
                self.in_flight -= 1


def test_decision_calls_in_flight_stay_within_the_setting(
    fake_redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[CountingDecisions] = []
    monkeypatch.setattr(
        registry, "build_provider", lambda pid, config: built.append(CountingDecisions(pid, config)) or built[-1]
    )
    monkeypatch.setenv("CASCADE_SCORING_MAX_PARALLEL", "2")
    settings = Settings(providers={"oracle": OpenAIConfig(model="gpt-test")}, chains={"default": ["oracle"]})
    assert settings.scoring_max_parallel == 2
    runtime = build_runtime(settings, fake_redis, worker_name="unit-worker")
    reply = run(runtime, hallucination_score={"n_samples": 3, "m": 3})
    assert reply.replies[0].meta.hallucination_scoring_calls == 12 == len(built[0].decisions)
    assert 1 <= built[0].peak <= 2
