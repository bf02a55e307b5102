"""The spans this test process's global tracer provider records (the producer's publish hook
and the hop spans use the global tracer, as in a worker)."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


def global_spans() -> InMemorySpanExporter:
    """The in-memory exporter of the global tracer provider (installed once), emptied."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter: InMemorySpanExporter | None = getattr(provider, "cascade_test_exporter", None)
    if exporter is None:
        exporter = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        provider.cascade_test_exporter = exporter  # type: ignore[attr-defined]
    exporter.clear()
    return exporter
