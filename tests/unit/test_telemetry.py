"""Telemetry (worker/telemetry/observer.py, tracing.py, metrics.py, prometheus.py, hooks.py) on real
requests run by RequestRunner over fakeredis: spans from the SDK's in-memory exporter, metrics
from its in-memory reader. A hand-off travels through a real Celery publish (memory broker), so
the trace context rides in the message headers exactly as between two workers."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fakeredis
import pytest
from celery import Celery
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from settings import ScriptedConfig, Settings
from tasks.contract.schemas import TASK_NAME, AttemptRecord, ChatReply, ChatRequest, HandOff
from tasks.producer import tracing as producer_tracing
from tasks.runner import RequestRunner, TaskContext
from tests.support.spans import global_spans
from worker.runtime import WorkerRuntime, build_runtime
from worker.telemetry import hooks, logs
from worker.telemetry import sdk as otel_sdk
from worker.telemetry.metrics import CascadeMetrics, fallbacks, observe_redis
from worker.telemetry.observer import TelemetryConfig, TelemetryObserver, telemetry_observer
from worker.telemetry.prometheus import MergedCollector, SnapshotWriter

PROMPT = "PROMPT-MARKER tell me"
TEXT = "REPLY-MARKER from the steady one"


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return global_spans()


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


PROVIDERS: dict[str, dict[str, Any]] = {
    "flaky": {"text": "never", "fail": "server_error", "max_retries": 1, "backoff_initial_s": 0.01},
    "steady": {"text": TEXT, "model": "steady-model", "chunk_size": 6},
    "gpu": {"text": TEXT, "model": "gpu-model", "queue": "chat.gpu"},
    "broken": {"text": "never", "fail": "auth", "cooldown_failures": 1, "cooldown_s": 60},
}


def make_runtime(client: fakeredis.FakeRedis, reader: InMemoryMetricReader, **fields: Any) -> WorkerRuntime:
    settings = Settings(
        providers={pid: ScriptedConfig(**entry) for pid, entry in PROVIDERS.items()},
        chains={"default": ["flaky", "steady"], "hop": ["flaky", "gpu"], "cooling": ["broken", "steady"]},
        **fields,
    )
    runtime = build_runtime(settings, client, worker_name="unit-worker")
    observer = TelemetryObserver(settings, meter=MeterProvider(metric_readers=[reader]).get_meter("cascade"))
    runtime.observers.append(observer)
    runtime.cooldowns._on_trip = observer.cooldown_tripped
    return runtime


def as_task(headers: dict[str, Any], queue: str) -> Any:
    """A task whose ``request`` holds what Celery's does for a message with ``headers``."""
    return SimpleNamespace(request=SimpleNamespace(delivery_info={"routing_key": queue}, **headers))


def run_hop(
    runtime: WorkerRuntime,
    request: ChatRequest,
    queue: str,
    headers: dict[str, Any],
    *,
    handoff: HandOff | None = None,
    sender: Any = None,
) -> ChatReply | HandOff:
    """One task run as a worker does it: task_prerun, the runner, task_postrun."""
    task_id = str(headers.get("id", request.request_id))
    kwargs: dict[str, Any] = {"request": request.model_dump(mode="json")}
    if handoff is not None:
        kwargs["handoff"] = handoff.model_dump(mode="json")
    hooks.task_started(task_id=task_id, task=as_task(headers, queue), kwargs=kwargs)
    context = TaskContext(task_id=task_id, queue=queue, local_queues=frozenset({queue}))
    outcome = RequestRunner(runtime, request, context, handoff=handoff, sender=sender).run()
    assert outcome is not None
    result = outcome.model_dump(mode="json") if isinstance(outcome, ChatReply) else {"status": "handed_off"}
    hooks.task_finished(task_id=task_id, retval=result)
    return outcome


class Broker:
    """A producer's Celery app on a memory broker: publishing runs before_task_publish."""

    def __init__(self) -> None:
        self.app = Celery("unit-producer", broker="memory://", set_as_current=False)
        self.app.conf.update(task_serializer="json", accept_content=["json"])

    def send(self, queue: str, kwargs: dict[str, Any], task_id: str) -> dict[str, Any]:
        self.app.send_task(TASK_NAME, kwargs=kwargs, queue=queue, task_id=task_id)
        with self.app.connection() as connection:
            message = connection.SimpleQueue(queue).get(timeout=5)
            message.ack()
            headers: dict[str, Any] = message.headers
            return headers


def named(spans: list[ReadableSpan], prefix: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name.startswith(prefix)]


def points(reader: InMemoryMetricReader, name: str) -> list[tuple[dict[str, Any], Any]]:
    data = reader.get_metrics_data()
    found = []
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    found += [(dict(p.attributes or {}), p) for p in metric.data.data_points]
    return found


def value(reader: InMemoryMetricReader, name: str, **attributes: Any) -> float:
    total = 0.0
    for attrs, point in points(reader, name):
        if all(attrs.get(k) == v for k, v in attributes.items()):
            total += point.count if hasattr(point, "count") else point.value
    return total


def all_text(spans: list[ReadableSpan]) -> str:
    return json.dumps([{k: str(v) for k, v in (s.attributes or {}).items()} for s in spans])


def test_a_fallback_gives_a_span_per_attempt_under_the_producers_trace(
    fake_redis: fakeredis.FakeRedis, reader: InMemoryMetricReader, spans: InMemorySpanExporter
) -> None:
    runtime = make_runtime(fake_redis, reader)
    request = ChatRequest(request_id="req-fallback", prompt=PROMPT, generation_kwargs={"max_tokens": 50})
    with trace.get_tracer("test").start_as_current_span("producer work") as outer:
        headers = Broker().send("chat", {"request": request.model_dump(mode="json")}, "req-fallback")
    assert headers["traceparent"].split("-")[1] == format(outer.get_span_context().trace_id, "032x")
    reply = run_hop(runtime, request, "chat", headers)
    assert isinstance(reply, ChatReply) and reply.status == "succeeded"

    finished = list(spans.get_finished_spans())
    assert {s.context.trace_id for s in finished} == {outer.get_span_context().trace_id}
    (publish,) = named(finished, "publish chat")
    (process,) = named(finished, "process chat")
    assert publish.kind == SpanKind.PRODUCER and publish.parent is not None
    assert publish.parent.span_id == outer.get_span_context().span_id
    assert process.kind == SpanKind.CONSUMER and process.parent is not None
    assert process.parent.span_id == publish.context.span_id
    assert process.attributes is not None and process.attributes["cascade.request_id"] == "req-fallback"
    assert process.attributes["cascade.status"] == "succeeded"
    assert process.attributes["gen_ai.response.model"] == "steady-model"

    attempts = named(finished, "chat")
    assert [s.attributes["cascade.provider"] for s in attempts if s.attributes] == ["flaky", "flaky", "steady"]
    assert all(s.kind == SpanKind.CLIENT and s.parent and s.parent.span_id == process.context.span_id for s in attempts)
    first, second, answer = attempts
    assert first.name == "chat scripted" and answer.name == "chat steady-model"
    for failed in (first, second):
        assert failed.attributes is not None
        assert failed.attributes["cascade.outcome"] == "failed"
        assert failed.attributes["error.type"] == "server_error"
        assert failed.status.status_code == StatusCode.ERROR
    assert answer.attributes is not None
    assert answer.attributes["gen_ai.operation.name"] == "chat"
    assert answer.attributes["gen_ai.provider.name"] == "cascade.scripted"
    assert answer.attributes["gen_ai.request.model"] == "steady-model"
    assert answer.attributes["gen_ai.request.max_tokens"] == 50
    assert answer.attributes["gen_ai.response.model"] == "steady-model"
    assert answer.attributes["gen_ai.response.finish_reasons"] == ("stop",)
    usage = reply.replies[0].meta.usage
    assert answer.attributes["gen_ai.usage.input_tokens"] == usage.prompt_tokens > 0
    assert answer.attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens > 0
    assert "error.type" not in answer.attributes
    # Windows in order, inside the hop.
    assert process.start_time is not None and process.end_time is not None
    times = [(s.start_time or 0, s.end_time or 0) for s in attempts]
    assert all(process.start_time <= start <= end <= process.end_time for start, end in times)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(times))
    # No prompt or reply text anywhere unless asked for.
    assert "PROMPT-MARKER" not in all_text(finished) and "REPLY-MARKER" not in all_text(finished)

    assert value(reader, "cascade.requests", chain="default", status="succeeded") == 1
    assert value(reader, "cascade.attempts", provider="flaky", outcome="failed", error_type="server_error") == 2
    assert value(reader, "cascade.attempts", provider="steady", outcome="succeeded") == 1
    assert value(reader, "cascade.fallbacks", provider="flaky", error_type="server_error") == 1
    assert value(reader, "cascade.request.duration", chain="default", status="succeeded") == 1
    assert value(reader, "cascade.request.time_to_first_token", chain="default") == 1
    assert value(reader, "cascade.output.tokens_per_second", provider="steady") == 1
    assert value(reader, "gen_ai.client.token.usage", **{"gen_ai.token.type": "output"}) == 1
    assert value(reader, "gen_ai.client.operation.duration", **{"error.type": "server_error"}) == 2


def test_a_hand_off_continues_the_trace_on_the_next_queue(
    fake_redis: fakeredis.FakeRedis, reader: InMemoryMetricReader, spans: InMemorySpanExporter
) -> None:
    runtime = make_runtime(fake_redis, reader)
    broker = Broker()
    request = ChatRequest(request_id="req-hop", prompt=PROMPT, chain="hop")
    first_headers = broker.send("chat", {"request": request.model_dump(mode="json")}, "req-hop")
    sent: dict[str, Any] = {}

    class Sender:  # what tasks.chat's sender does, through Celery
        def send(
            self, queue: str, kwargs: dict[str, Any], request_id: str | None = None, *, task: str = "cascade.chat"
        ) -> None:
            state = HandOff.model_validate(kwargs["handoff"])
            sent.update(queue=queue, state=state, headers=broker.send(queue, kwargs, "hop-task-2"))

    state = run_hop(runtime, request, "chat", first_headers, sender=Sender())
    assert isinstance(state, HandOff) and sent["queue"] == "chat.gpu"
    reply = run_hop(runtime, request, "chat.gpu", sent["headers"], handoff=sent["state"])
    assert isinstance(reply, ChatReply) and reply.meta.provider == "gpu" and reply.meta.queue_hops == 1

    finished = list(spans.get_finished_spans())
    assert len({s.context.trace_id for s in finished}) == 1
    hop1 = named(finished, "process chat")[0]
    hop2 = named(finished, "process chat.gpu")[0]
    handoff = named(finished, "publish chat.gpu")[0]
    assert handoff.attributes is not None and handoff.attributes["cascade.handoff"] is True
    assert handoff.parent is not None and handoff.parent.span_id == hop1.context.span_id
    assert hop2.parent is not None and hop2.parent.span_id == handoff.context.span_id
    assert hop1.attributes is not None and hop1.attributes["cascade.status"] == "handed_off"
    assert hop1.attributes["cascade.handoff.queue"] == "chat.gpu"
    assert hop2.attributes is not None and hop2.attributes["cascade.queue_hops"] == 1
    # Each attempt once, under the hop that made it.
    by_parent = {
        hop.name: [
            s.attributes["cascade.provider"]
            for s in named(finished, "chat ")
            if s.attributes and s.parent and s.parent.span_id == hop.context.span_id
        ]
        for hop in (hop1, hop2)
    }
    assert by_parent == {"process chat": ["flaky", "flaky"], "process chat.gpu": ["gpu"]}

    assert value(reader, "cascade.handoffs", chain="hop", queue="chat.gpu") == 1
    assert value(reader, "cascade.requests", chain="hop") == 1  # counted once, where it ended
    assert value(reader, "cascade.fallbacks", provider="flaky") == 1
    assert value(reader, "cascade.attempts", provider="flaky") == 2
    assert value(reader, "cascade.attempts", provider="gpu", outcome="succeeded") == 1


def test_prompt_and_reply_text_are_recorded_only_when_enabled(
    fake_redis: fakeredis.FakeRedis, reader: InMemoryMetricReader, spans: InMemorySpanExporter
) -> None:
    runtime = make_runtime(fake_redis, reader)
    observer = runtime.observers[-1]
    assert isinstance(observer, TelemetryObserver)
    observer._capture = True
    request = ChatRequest(request_id="req-content", prompt=PROMPT)
    run_hop(runtime, request, "chat", {"id": "req-content"})
    answer = next(
        s for s in spans.get_finished_spans() if s.attributes and s.attributes.get("cascade.outcome") == "succeeded"
    )
    assert answer.attributes is not None
    assert json.loads(str(answer.attributes["gen_ai.input.messages"]))[-1]["parts"][0]["content"] == PROMPT
    assert "REPLY-MARKER" in str(answer.attributes["gen_ai.output.messages"])


def test_a_tripped_cooldown_and_the_skips_it_causes_are_counted(
    fake_redis: fakeredis.FakeRedis, reader: InMemoryMetricReader, spans: InMemorySpanExporter
) -> None:
    runtime = make_runtime(fake_redis, reader)
    for number in (1, 2):
        request = ChatRequest(request_id=f"req-cool-{number}", prompt=PROMPT, chain="cooling")
        run_hop(runtime, request, "chat", {"id": request.request_id})
    assert value(reader, "cascade.cooldowns", provider="broken") == 1
    assert value(reader, "cascade.attempts", provider="broken", outcome="failed", error_type="auth") == 1
    assert value(reader, "cascade.attempts", provider="broken", outcome="skipped") == 1
    assert value(reader, "cascade.fallbacks", provider="broken", error_type="auth") == 1
    assert value(reader, "cascade.fallbacks", provider="broken", error_type="provider_unavailable") == 1
    skipped = [
        s for s in spans.get_finished_spans() if s.attributes and s.attributes.get("cascade.outcome") == "skipped"
    ]
    assert len(skipped) == 1 and skipped[0].attributes is not None
    assert skipped[0].attributes["error.type"] == "provider_unavailable"


def test_queue_depth_and_cooldown_gauges_read_redis(fake_redis: fakeredis.FakeRedis) -> None:
    fake_redis.lpush("chat", "a", "b", "c")
    fake_redis.lpush("chat\x06\x169", "urgent")  # kombu's list for priority step 9
    fake_redis.lpush("chat.gpu", "d")
    fake_redis.set("cascade:cooldown:broken", "1")
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("cascade")
    observe_redis(meter, fake_redis, ["chat", "chat.gpu", "chat.idle"], ["broken", "steady"])
    depth = {attrs["queue"]: point.value for attrs, point in points(reader, "cascade.queue.depth")}
    assert depth == {"chat": 4, "chat.gpu": 1, "chat.idle": 0}
    cooling = {attrs["provider"]: point.value for attrs, point in points(reader, "cascade.provider.cooling_down")}
    assert cooling == {"broken": 1, "steady": 0}


def test_fallbacks_are_moves_to_another_provider() -> None:
    def attempt(provider: str, outcome: str = "failed") -> AttemptRecord:
        return AttemptRecord(provider=provider, index=0, attempt=1, outcome=outcome)  # type: ignore[arg-type]

    retried = [attempt("a"), attempt("a"), attempt("b"), attempt("c", "succeeded")]
    assert [r.provider for r in fallbacks(retried, 0, chain_continues=False)] == ["a", "b"]
    assert [r.provider for r in fallbacks(retried, 2, chain_continues=False)] == ["b"]
    assert fallbacks([attempt("a")], 0, chain_continues=False) == []  # the last one: all failed
    assert [r.provider for r in fallbacks([attempt("a")], 0, chain_continues=True)] == ["a"]  # handed off


def test_config_comes_from_the_standard_variables() -> None:
    assert not TelemetryConfig.from_env({}).enabled
    on = TelemetryConfig.from_env(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "CASCADE_METRICS_PORT": "9464"}
    )
    assert on.traces and on.otlp_metrics and on.metrics_port == 9464 and on.metrics_host == "0.0.0.0"
    assert TelemetryConfig.from_env({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}).traces
    only_traces = TelemetryConfig.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_METRICS_EXPORTER": "none"})
    assert only_traces.traces and not only_traces.metrics
    assert not TelemetryConfig.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": ""}).enabled  # compose's "unset"
    disabled = {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "CASCADE_METRICS_PORT": "1"}
    assert not TelemetryConfig.from_env(disabled).enabled
    with pytest.raises(ValueError, match="CASCADE_METRICS_PORT"):
        TelemetryConfig.from_env({"CASCADE_METRICS_PORT": "http"})


def test_the_observer_is_registered_only_when_telemetry_is_on(
    fake_redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(providers={"steady": ScriptedConfig(text="hi")}, chains={"default": ["steady"]})
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("CASCADE_METRICS_PORT", raising=False)
    assert telemetry_observer(settings) is None
    assert build_runtime(settings, fake_redis).observers == []
    monkeypatch.setenv("CASCADE_METRICS_PORT", "9464")
    runtime = build_runtime(settings, fake_redis)
    (observer,) = runtime.observers
    assert isinstance(observer, TelemetryObserver)
    assert runtime.cooldowns._on_trip == observer.cooldown_tripped


def test_the_endpoint_merges_live_pool_processes_and_forgets_dead_ones(tmp_path: Path) -> None:
    def registry_with(count: int) -> CollectorRegistry:
        registry = CollectorRegistry()
        provider = MeterProvider(metric_readers=[otel_sdk.prometheus_reader(registry)])
        CascadeMetrics(provider.get_meter("cascade")).requests.add(count, {"chain": "default", "status": "succeeded"})
        return registry

    SnapshotWriter(tmp_path, registry_with(2), "1").write()  # this process: alive
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    stale = tmp_path / f"2.{int(dead.stdout)}.prom"
    stale.write_bytes(generate_latest(registry_with(5)))
    own = CollectorRegistry()
    reader = otel_sdk.prometheus_reader(own)
    gauge_meter = MeterProvider(metric_readers=[reader]).get_meter("cascade")
    observe_redis(gauge_meter, fakeredis.FakeRedis(), ["chat"], [])

    merged = CollectorRegistry(auto_describe=False)
    merged.register(MergedCollector(own, tmp_path))
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(merged).decode())}
    requests = [(s.labels["worker_process"], s.value) for s in families["cascade_requests"].samples]
    assert requests == [("1", 2.0)]
    assert [(s.labels["worker_process"], s.labels["queue"]) for s in families["cascade_queue_depth"].samples] == [
        ("main", "chat")
    ]
    assert not stale.exists()


def test_spans_and_log_records_carry_only_a_valid_request_id(spans: InMemorySpanExporter) -> None:
    """The hop span and the log context are opened before the request is validated: a hostile
    message's request id, chain, hand-off count and task id never reach them as they came."""
    hostile = "evil id\nwith spaces " + "x" * 5_000
    kwargs = {"request": {"request_id": hostile, "chain": "c" * 5_000, "prompt": "hi"}, "handoff": {"queue_hops": "9"}}
    task_id = "t" * 5_000
    hooks.task_started(task_id=task_id, task=as_task({}, "chat"), kwargs=kwargs)
    try:
        assert logs.current_request_id() is None
    finally:
        hooks.task_finished(task_id=task_id, retval={"status": "failed", "error": {"type": "invalid_request"}})
    (process,) = named(list(spans.get_finished_spans()), "process chat")
    attributes = dict(process.attributes or {})
    assert {"cascade.request_id", "cascade.chain", "cascade.queue_hops"}.isdisjoint(attributes), attributes
    assert attributes["messaging.message.id"] == task_id[: producer_tracing.MAX_MESSAGE_ID_CHARS]
    assert "evil id" not in all_text([process])

    # A valid id in the request wins; without one, a valid task id stands in for it.
    kwargs = {"request": {"prompt": "hi", "chain": "default"}}
    hooks.task_started(task_id="task-42", task=as_task({}, "chat"), kwargs=kwargs)
    try:
        assert logs.current_request_id() == "task-42"
    finally:
        hooks.task_finished(task_id="task-42", retval={"status": "succeeded"})
    process = named(list(spans.get_finished_spans()), "process chat")[-1]
    assert process.attributes is not None and process.attributes["cascade.request_id"] == "task-42"
    assert process.attributes["cascade.chain"] == "default"
