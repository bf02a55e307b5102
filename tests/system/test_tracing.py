"""Telemetry of real workers: a producer's trace continues through an API worker (a fallback),
a hand-off and a local-model-queue worker, exported over OTLP/HTTP to a receiver on 127.0.0.1;
the workers' logs are JSON lines carrying the request and trace ids and never the prompt or the
reply; one Prometheus endpoint serves every pool process of a prefork worker."""

from __future__ import annotations

import gzip
import json
import threading
import time
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from prometheus_client.parser import text_string_to_metric_families

from tasks.producer.client import CascadeClient
from tests.support.spans import global_spans
from tests.support.stack import local_stack
from tests.support.waiting import wait_until
from worker.demo.local import free_port

pytestmark = pytest.mark.integration

PROMPT = "PROMPT-MARKER what is the capital of France?"
REPLY = "REPLY-MARKER Paris is the capital of France."
# How long the spans, log lines and metrics of a finished request may take to arrive.
WAIT_S = 20.0

CONFIG = f"""
[providers.flaky]
type = "scripted"
text = "never"
fail = "server_error"
max_retries = 1
backoff_initial_s = 0.01

[providers.api]
type = "scripted"
model = "api-model"
text = "{REPLY}"
chunk_size = 8

[providers.gpu]
type = "scripted"
model = "gpu-model"
text = "{REPLY}"
chunk_size = 8
queue = "chat.gpu"

[providers.slow]
type = "scripted"
model = "slow-model"
text = "{REPLY}"
chunk_size = 8
chunk_delay_ms = 100

[chains]
fallback = ["flaky", "api"]
hop = ["flaky", "gpu"]
slow = ["slow"]
"""


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: str
    attributes: dict[str, Any]
    status: int
    service: str


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


class OtlpReceiver:
    """An OTLP/HTTP trace receiver on 127.0.0.1 that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                encoding = self.headers.get("Content-Encoding")
                body = gzip.decompress(body) if encoding == "gzip" else zlib.decompress(body) if encoding else body
                if self.path == "/v1/traces":
                    receiver._add(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def _add(self, export: trace_service_pb2.ExportTraceServiceRequest) -> None:
        for resource_spans in export.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    found = Span(
                        span.trace_id.hex(),
                        span.span_id.hex(),
                        span.parent_span_id.hex(),
                        span.name,
                        span.SpanKind.Name(span.kind),
                        {kv.key: _value(kv.value) for kv in span.attributes},
                        span.status.code,
                        str(resource.get("service.name")),
                    )
                    with self._lock:
                        self.spans.append(found)

    def trace(self, trace_id: str) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass
class Stack:
    url: str
    receiver: OtlpReceiver
    metrics_url: str
    api_log: Path
    gpu_log: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """An API worker (``chat``, two pool processes, JSON logs, the metrics endpoint) and a
    local-model worker (``chat.gpu``, Celery's text log format), both exporting to one receiver."""
    receiver = OtlpReceiver()
    port = free_port()
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_METRICS_EXPORTER": "none",
    }
    api_env = {
        "OTEL_SERVICE_NAME": "cascade-api",
        "CASCADE_LOG_FORMAT": "json",
        "CASCADE_METRICS_PORT": str(port),
        "CASCADE_METRICS_HOST": "127.0.0.1",
    }
    try:
        with local_stack(
            tmp_path_factory.mktemp("tracing"),
            CONFIG,
            queues=("chat", "chat.gpu"),
            extra_env=otel,
            env_of={"chat": api_env, "chat.gpu": {"OTEL_SERVICE_NAME": "cascade-gpu"}},
            concurrency_of={"chat": 2},
        ) as local:
            metrics_url = f"http://127.0.0.1:{port}/metrics"
            yield Stack(local.url, receiver, metrics_url, local.logs["chat"], local.logs["chat.gpu"])
    finally:
        receiver.stop()


def by_name(spans: list[Span], name: str) -> list[Span]:
    return [s for s in spans if s.name == name]


def test_one_trace_from_the_producer_through_a_fallback_and_a_hand_off(stack: Stack) -> None:
    exporter = global_spans()
    with trace.get_tracer("test-producer").start_as_current_span("checkout") as root:
        with CascadeClient(stack.url) as client:
            request_id = client.submit(prompt=PROMPT, chain="hop", generation_kwargs={"max_tokens": 64})
            reply = client.wait(request_id, timeout_s=60)
    assert reply.status == "succeeded" and reply.meta.provider == "gpu" and reply.meta.queue_hops == 1
    trace_id = format(root.get_span_context().trace_id, "032x")
    (publish,) = [s for s in exporter.get_finished_spans() if s.name == "publish chat"]
    assert publish.context.trace_id == root.get_span_context().trace_id  # the producer's own span

    spans = wait_until(
        lambda: (found := stack.receiver.trace(trace_id)) and len(found) >= 6 and found,
        timeout_s=WAIT_S,
        what="the workers' spans",
    )
    time.sleep(0.5)  # let stragglers in, then look at everything the trace holds
    spans = stack.receiver.trace(trace_id)
    hop1, hop2 = by_name(spans, "process chat"), by_name(spans, "process chat.gpu")
    assert len(hop1) == len(hop2) == 1
    hop1_span, hop2_span = hop1[0], hop2[0]
    (handoff,) = by_name(spans, "publish chat.gpu")
    # producer publish -> hop 1 -> hand-off publish -> hop 2
    assert hop1_span.parent_id == format(publish.context.span_id, "016x")
    assert handoff.parent_id == hop1_span.span_id and handoff.kind == "SPAN_KIND_PRODUCER"
    assert hop2_span.parent_id == handoff.span_id and hop2_span.kind == "SPAN_KIND_CONSUMER"
    assert hop1_span.service == "cascade-api" and hop2_span.service == "cascade-gpu"
    assert hop1_span.attributes["cascade.request_id"] == request_id == hop2_span.attributes["cascade.request_id"]
    assert hop1_span.attributes["cascade.status"] == "handed_off"
    assert hop2_span.attributes["cascade.status"] == "succeeded"

    attempts = [s for s in spans if s.kind == "SPAN_KIND_CLIENT"]
    assert sorted((s.parent_id, s.attributes["cascade.provider"]) for s in attempts) == sorted(
        [(hop1_span.span_id, "flaky"), (hop1_span.span_id, "flaky"), (hop2_span.span_id, "gpu")]
    )
    for failed in (s for s in attempts if s.attributes["cascade.provider"] == "flaky"):
        assert failed.attributes["cascade.outcome"] == "failed" and failed.attributes["error.type"] == "server_error"
        assert failed.status == 2  # STATUS_CODE_ERROR
    (answer,) = [s for s in attempts if s.attributes["cascade.provider"] == "gpu"]
    usage = reply.replies[0].meta.usage
    assert answer.name == "chat gpu-model"
    assert answer.attributes["gen_ai.request.model"] == answer.attributes["gen_ai.response.model"] == "gpu-model"
    assert answer.attributes["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert answer.attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens
    assert answer.attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert answer.attributes["gen_ai.request.max_tokens"] == 64
    everything = json.dumps([s.attributes for s in spans])
    assert "PROMPT-MARKER" not in everything and "REPLY-MARKER" not in everything


def test_worker_logs_are_json_lines_with_request_and_trace_ids_and_no_text(stack: Stack) -> None:
    exporter = global_spans()
    with trace.get_tracer("test-producer").start_as_current_span("checkout") as root:
        with CascadeClient(stack.url) as client:
            request_id = client.submit(prompt=PROMPT, chain="fallback")
            assert client.wait(request_id, timeout_s=60).status == "succeeded"
    assert exporter.get_finished_spans()
    trace_id = format(root.get_span_context().trace_id, "032x")

    def task_lines() -> list[dict[str, Any]]:
        parsed = [json.loads(line) for line in stack.api_log.read_text().splitlines() if line.strip()]
        return [line for line in parsed if line.get("request_id") == request_id]

    lines = wait_until(
        lambda: (found := task_lines()) and any("succeeded in" in line["message"] for line in found) and found,
        timeout_s=WAIT_S,
        what="the task's log lines",
    )
    assert {line["trace_id"] for line in lines} == {trace_id}
    assert any(line["logger"] == "tasks.runner" and line["level"] == "WARNING" for line in lines)  # the fallback
    (success,) = [line for line in lines if "succeeded in" in line["message"]]
    assert success["message"].endswith(": status=succeeded") and success["logger"] == "celery.app.trace"
    # Every line of the JSON worker parses (json.loads above), and no log holds the texts.
    for log in (stack.api_log, stack.gpu_log):
        text = log.read_text()
        assert "PROMPT-MARKER" not in text and "REPLY-MARKER" not in text, log.name
    assert "succeeded in" in stack.gpu_log.read_text()  # the text-format worker logged its tasks too


def scrape(url: str) -> dict[str, list[Any]]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def total(families: dict[str, list[Any]], sample: str, **labels: str) -> float:
    """The sum of the samples named ``sample`` (``x_total``, ``x_count``...) with ``labels``."""
    return sum(
        s.value
        for samples in families.values()
        for s in samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_one_metrics_endpoint_serves_every_pool_process(stack: Stack) -> None:
    with CascadeClient(stack.url) as client:
        ids = [client.submit(prompt=PROMPT, chain="slow") for _ in range(4)]
        replies = [client.wait(request_id, timeout_s=60) for request_id in ids]
        client.submit(prompt=PROMPT, chain="no-such-chain")  # rejected by the worker
    assert {reply.status for reply in replies} == {"succeeded"}
    assert len({reply.meta.worker for reply in replies}) == 2  # both pool processes answered

    def counted() -> dict[str, list[Any]] | None:
        families = scrape(stack.metrics_url)
        done = total(families, "cascade_requests_total", chain="slow", status="succeeded") == 4
        rejected = total(families, "cascade_requests_rejected_total", error_type="unknown_chain") == 1
        return families if done and rejected else None

    families = wait_until(counted, timeout_s=WAIT_S, what="the pool processes' metrics")
    processes = {s.labels["worker_process"] for s in families["cascade_requests"] if s.labels["chain"] == "slow"}
    assert processes == {"1", "2"}
    assert total(families, "cascade_attempts_total", provider="slow", outcome="succeeded") == 4
    assert total(families, "cascade_request_duration_seconds_count", chain="slow") == 4
    assert total(families, "cascade_request_time_to_first_token_seconds_count", chain="slow") == 4
    assert total(families, "cascade_output_tokens_per_second_count", provider="slow") == 4
    depth = {s.labels["queue"]: s.value for s in families["cascade_queue_depth"]}
    # Read at the scrape, after every request was answered (the rejected one too): nothing waits.
    assert depth == {"chat": 0, "chat.gpu": 0}
    assert {s.labels["worker_process"] for s in families["cascade_queue_depth"]} == {"main"}
