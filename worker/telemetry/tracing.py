"""Traces: one trace per request, from the producer's publish through every hop and attempt.

How the context travels: every process that sends ``cascade.chat`` — the producer client, a
worker handing a request off to another queue — runs ``on_before_task_publish`` (Celery's
``before_task_publish`` signal, connected by ``tasks.producer.tracing``, which this module imports). It opens a PRODUCER
span ``publish {queue}`` and injects its context (W3C ``traceparent``/``tracestate``, or
whatever ``OTEL_PROPAGATORS`` selects) into the Celery message headers, which Celery hands to
the worker as attributes of ``task.request``. ``start_hop`` (``task_prerun``) extracts it and
opens the CONSUMER span ``process {queue}`` as its child; that span is current while the task
runs, so a hand-off publishes under it and the next hop continues the same trace.

Provider attempts are recorded when the request finishes or hands off, from the reply's
``meta.attempts``: a CLIENT span ``chat {model}`` per attempt, with the GenAI attributes. The
chain reports each attempt's duration, not its start, so their windows are laid back to back,
ending when the hop ended (a retry's backoff wait shows as a gap before the first attempt).

Spans only use the OpenTelemetry API: without an SDK configured (``worker.telemetry.observer``) they
cost next to nothing, yet a producer's trace id still reaches the worker's logs.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode

from settings import ProviderConfigBase
from tasks.contract.schemas import AttemptRecord, ChatReply, ChatRequest, HandOff
from tasks.producer.tracing import get_tracer as get_tracer
from tasks.producer.tracing import message_chain, message_id, message_request_id, without_none
from worker.telemetry import genai

# The switch OpenTelemetry's GenAI instrumentations use: prompt and reply text go into spans
# only when it is "true".
CAPTURE_CONTENT_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"


def capture_content_enabled() -> bool:
    """True when prompt and reply text may be recorded in spans."""
    return os.environ.get(CAPTURE_CONTENT_ENV, "").strip().lower() == "true"


def _count(value: Any) -> int | None:
    """``value`` if it is a plain non-negative int (a hand-off's count, as its sender wrote it)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


# --- carrying the context in Celery messages ----------------------------------------------


def extract_context(task_request: Any) -> Context:
    """The context a Celery message carried (custom headers become ``task.request`` attributes)."""
    headers = getattr(task_request, "headers", None)
    carrier: dict[str, str] = {}
    for key in propagate.get_global_textmap().fields:
        value = getattr(task_request, key, None)
        if value is None and isinstance(headers, Mapping):
            value = headers.get(key)
        if isinstance(value, str):
            carrier[key] = value
    return propagate.extract(carrier)


# --- one hop: a task run on one worker -------------------------------------------------------


@dataclass
class Hop:
    """The ``process`` span of one task run and what the observer needs to know about it."""

    span: trace.Span
    request_id: str | None
    prior_attempts: int  # attempts made on earlier hops (carried in the hand-off state)
    started_ns: int
    observed: bool = False  # an observer annotated the span (the runner ran the request)
    _tokens: list[Token[Any]] = field(default_factory=list)


_hop: ContextVar[Hop | None] = ContextVar("cascade_hop", default=None)


def current_hop() -> Hop | None:
    """The hop of the task running in this context, if any."""
    return _hop.get()


def start_hop(task_request: Any, task_id: str | None, kwargs: Any) -> Hop:
    """Open the ``process {queue}`` span as a child of the message's context and make it
    current; ``end_hop`` closes it."""
    delivery = getattr(task_request, "delivery_info", None) or {}
    queue = delivery.get("routing_key") or "unknown"
    request = kwargs.get("request") if isinstance(kwargs, Mapping) else None
    handoff = kwargs.get("handoff") if isinstance(kwargs, Mapping) else None
    prior = handoff.get("attempts") if isinstance(handoff, Mapping) else None
    request_id = message_request_id(kwargs, task_id)
    attributes = {
        "messaging.operation.type": "process",
        "messaging.destination.name": queue,
        "messaging.message.id": message_id(task_id),
        "cascade.request_id": request_id,
        "cascade.chain": message_chain(request),
        "cascade.queue_hops": _count(handoff.get("queue_hops")) if isinstance(handoff, Mapping) else 0,
    }
    started = time.time_ns()
    span = get_tracer().start_span(
        f"process {queue}",
        context=extract_context(task_request),
        kind=SpanKind.CONSUMER,
        attributes=without_none(attributes),
        start_time=started,
    )
    hop = Hop(span, request_id, len(prior) if isinstance(prior, list) else 0, started)
    hop._tokens = [otel_context.attach(trace.set_span_in_context(span)), _hop.set(hop)]
    return hop


def end_hop(hop: Hop, retval: Any) -> None:
    """Close the hop's span; a task that never reached the runner (rejected input) is
    annotated from its return value."""
    if not hop.observed and isinstance(retval, Mapping):
        error = retval.get("error")
        if isinstance(retval.get("status"), str):
            hop.span.set_attribute("cascade.status", retval["status"])
        if isinstance(error, Mapping) and isinstance(error.get("type"), str):
            hop.span.set_attribute(genai.ERROR_TYPE, error["type"])
            hop.span.set_status(Status(StatusCode.ERROR, error["type"]))
    hop.span.end()
    context_token, hop_token = hop._tokens
    _hop.reset(hop_token)
    otel_context.detach(context_token)


def annotate_finished(span: trace.Span, reply: ChatReply) -> None:
    """Put a finished request's outcome on its hop span."""
    span.set_attribute("cascade.status", reply.status)
    if reply.meta.provider:
        span.set_attribute("cascade.provider", reply.meta.provider)
    span.set_attribute("cascade.total_attempts", reply.meta.total_attempts)
    if reply.replies:
        span.set_attribute(genai.RESPONSE_MODEL, reply.replies[0].meta.model)
    if reply.status != "succeeded" and reply.error is not None:
        span.set_attribute(genai.ERROR_TYPE, reply.error.type)
        span.set_status(Status(StatusCode.ERROR, reply.error.type))


def annotate_handed_off(span: trace.Span, state: HandOff, queue: str) -> None:
    """Say on the hop span where the request went next."""
    span.set_attribute("cascade.status", "handed_off")
    span.set_attribute("cascade.handoff.queue", queue)
    span.set_attribute("cascade.handoff.start_index", state.start_index)


# --- provider attempts ------------------------------------------------------------------------


def _messages_json(request: ChatRequest) -> str:
    return json.dumps(
        [{"role": m.role, "parts": [{"type": "text", "content": m.content}]} for m in request.conversation]
    )


def _reply_attributes(reply: ChatReply, capture_content: bool) -> dict[str, Any]:
    """Response attributes of the attempt that produced ``reply``."""
    metas = [r.meta for r in reply.replies]
    attributes: dict[str, Any] = {
        genai.RESPONSE_MODEL: metas[0].model if metas else None,
        genai.RESPONSE_FINISH_REASONS: [m.finish_reason or "unknown" for m in metas],
        genai.USAGE_INPUT_TOKENS: sum(m.usage.prompt_tokens for m in metas),
        genai.USAGE_OUTPUT_TOKENS: sum(m.usage.completion_tokens for m in metas),
    }
    if capture_content:
        attributes[genai.OUTPUT_MESSAGES] = json.dumps(
            [
                {"role": r.role, "parts": [{"type": "text", "content": r.content}], "finish_reason": finish}
                for r in reply.replies
                for finish in [r.meta.finish_reason]
            ]
        )
    return attributes


def record_attempts(
    tracer: trace.Tracer,
    request: ChatRequest,
    attempts: Sequence[AttemptRecord],
    providers: Mapping[str, ProviderConfigBase],
    *,
    reply: ChatReply | None,
    end_ns: int,
    not_before_ns: int | None = None,
    capture_content: bool = False,
) -> None:
    """One ``chat {model}`` CLIENT span per attempt, under the current span (see the module
    docstring for how their windows are derived)."""
    windows: list[tuple[AttemptRecord, int, int]] = []
    cursor = end_ns
    for record in reversed(attempts):
        start = cursor - int(max(record.duration_ms, 0.0) * 1_000_000)
        if not_before_ns is not None:
            start = max(start, not_before_ns)
        windows.append((record, start, cursor))
        cursor = start
    kwargs = request.generation_kwargs
    requested = {
        genai.REQUEST_MAX_TOKENS: kwargs.max_tokens,
        genai.REQUEST_TEMPERATURE: kwargs.temperature,
        genai.REQUEST_TOP_P: kwargs.top_p,
    }
    for record, start, end in reversed(windows):
        config = providers.get(record.provider)
        attributes: dict[str, Any] = {
            **genai.provider_attributes(config),
            **requested,
            "cascade.provider": record.provider,
            "cascade.chain_index": record.index,
            "cascade.attempt": record.attempt,
            "cascade.outcome": record.outcome,
            "cascade.chunks": record.chunks,
            "cascade.worker": record.worker,
            genai.ERROR_TYPE: record.error_type,
        }
        if record.outcome == "succeeded" and reply is not None:
            attributes.update(_reply_attributes(reply, capture_content))
            if capture_content:
                attributes[genai.INPUT_MESSAGES] = _messages_json(request)
        model = genai.request_model(config)
        span = tracer.start_span(
            f"{genai.CHAT} {model}" if model else genai.CHAT,
            kind=SpanKind.CLIENT,
            attributes=without_none(attributes),
            start_time=start,
        )
        if record.outcome == "failed":  # a skip (cooldown) or a stop (deadline, cancel) is no call that failed
            span.set_status(Status(StatusCode.ERROR, record.error_type or record.outcome))
        span.end(end_time=end)
