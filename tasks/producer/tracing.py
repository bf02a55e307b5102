"""The producer's half of tracing: each ``cascade.chat`` message sent carries its trace context.

Every process that sends a Cascade task — the producer client, a worker handing a request off
to another queue — imports this module, which connects ``on_before_task_publish`` to Celery's
``before_task_publish`` signal. It opens a PRODUCER span ``publish {queue}`` and injects its
context (W3C ``traceparent``/``tracestate``, or whatever ``OTEL_PROPAGATORS`` selects) into the
message headers; the worker's side (``worker.telemetry.tracing``) continues the trace from
there. Only the OpenTelemetry API is used: a no-op until a process installs an SDK.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from celery.signals import before_task_publish
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

from tasks.contract.schemas import CHAIN_PATTERN, usable_request_id

TRACER_NAME = "cascade"
# The longest message id (a header its producer chose) a span records; Celery's own are 36.
MAX_MESSAGE_ID_CHARS = 128
_CHAIN_NAME = re.compile(CHAIN_PATTERN)


def get_tracer() -> trace.Tracer:
    """Cascade's tracer from the global provider (a no-op one until an SDK is set up)."""
    return trace.get_tracer(TRACER_NAME)


def without_none(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """Span attributes less those with no value (OpenTelemetry refuses None)."""
    return {key: value for key, value in attributes.items() if value is not None}


def message_request_id(kwargs: Any, task_id: Any) -> str | None:
    """The request id of a ``cascade.chat`` message: the request's own, else the task id, and
    only one that is a valid request id (``tasks.intake.usable_request_id``). Spans and log
    records get it before the request is validated: a producer's text of any length or
    alphabet must not reach them."""
    request = kwargs.get("request") if isinstance(kwargs, Mapping) else None
    request_id = request.get("request_id") if isinstance(request, Mapping) else None
    if request_id is not None:  # the producer named one: the reply goes there or nowhere
        return usable_request_id(request_id) if isinstance(request_id, str) else None
    return usable_request_id(task_id) if isinstance(task_id, str) else None


def message_chain(request: Any) -> str | None:
    """The chain a message's request names, if it is a valid chain name (else None)."""
    chain = request.get("chain", "default") if isinstance(request, Mapping) else None
    return chain if isinstance(chain, str) and _CHAIN_NAME.fullmatch(chain) else None


def message_id(task_id: Any) -> str | None:
    """A message's task id as a span records it: a string, cut to ``MAX_MESSAGE_ID_CHARS``."""
    return task_id[:MAX_MESSAGE_ID_CHARS] if isinstance(task_id, str) else None


def on_before_task_publish(
    sender: str | None = None,
    body: Any = None,
    routing_key: str | None = None,
    headers: dict[str, Any] | None = None,
    **_: Any,
) -> None:
    """Open a ``publish`` span and put its context into the outgoing message's headers.

    A message whose headers already carry a context (set by its sender) is left alone.
    """
    if not isinstance(headers, dict) or any(key in headers for key in propagate.get_global_textmap().fields):
        return
    kwargs = body[1] if isinstance(body, (list, tuple)) and len(body) == 3 else None
    request = kwargs.get("request") if isinstance(kwargs, Mapping) else None
    task_id = headers.get("id") if isinstance(headers.get("id"), str) else None
    attributes = {
        "messaging.operation.type": "send",
        "messaging.destination.name": routing_key,
        "messaging.message.id": message_id(task_id),
        "cascade.task": sender,
        "cascade.request_id": message_request_id(kwargs, task_id),
        "cascade.chain": message_chain(request),
        "cascade.handoff": isinstance(kwargs, Mapping) and "handoff" in kwargs,
    }
    with get_tracer().start_as_current_span(
        f"publish {routing_key}", kind=SpanKind.PRODUCER, attributes=without_none(attributes)
    ):
        propagate.inject(headers)


before_task_publish.connect(on_before_task_publish, weak=False)
