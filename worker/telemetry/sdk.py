"""Building the OpenTelemetry SDK of a worker process (the ``otel`` extra).

Imported only when telemetry is on (``worker.telemetry.observer``), so an API-only install pays for
none of it. Exporters read the standard variables themselves: ``OTEL_EXPORTER_OTLP_*``
(endpoint, headers, timeout, compression, certificates), ``OTEL_BSP_*``,
``OTEL_METRIC_EXPORT_INTERVAL``; the tracer provider reads ``OTEL_TRACES_SAMPLER``; the
resource reads ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import CollectorRegistry

DEFAULT_SERVICE_NAME = "cascade-worker"


def resource() -> Resource:
    """This process's resource: ``OTEL_*`` settings, ``cascade-worker`` unless a service name
    is set, and an instance id naming the host and the process."""
    found = Resource.create({"service.instance.id": f"{socket.gethostname()}/{os.getpid()}"})
    if str(found.attributes.get("service.name", "")).startswith("unknown_service"):
        found = found.merge(Resource({"service.name": DEFAULT_SERVICE_NAME}))
    return found


def tracer_provider() -> TracerProvider:
    """A tracer provider exporting over OTLP/HTTP in batches."""
    provider = TracerProvider(resource=resource())
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def prometheus_reader(registry: CollectorRegistry) -> MetricReader:
    """A reader that serves ``registry`` (no scope labels or target_info: one scope, and the
    scrape target already names the worker)."""
    return PrometheusMetricReader(disable_target_info=True, scope_info_enabled=False, registry=registry)


class _ThisProcessOnly(MetricExporter):
    """Exports only from the process that built it. The SDK restarts a periodic reader's
    thread in a forked child, which would otherwise export the parent's metrics again."""

    def __init__(self, inner: MetricExporter) -> None:
        super().__init__()
        self._inner = inner
        self._pid = os.getpid()

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        if os.getpid() != self._pid:
            return MetricExportResult.SUCCESS
        return self._inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return os.getpid() != self._pid or self._inner.force_flush(timeout_millis=timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        if os.getpid() == self._pid:
            self._inner.shutdown(timeout_millis=timeout_millis, **kwargs)


def otlp_reader() -> MetricReader:
    """A reader that pushes metrics over OTLP/HTTP every ``OTEL_METRIC_EXPORT_INTERVAL``."""
    return PeriodicExportingMetricReader(_ThisProcessOnly(OTLPMetricExporter()))


def meter_provider(readers: Sequence[MetricReader]) -> MeterProvider:
    """A meter provider with ``readers``."""
    return MeterProvider(resource=resource(), metric_readers=list(readers))
