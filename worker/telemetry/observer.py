"""A worker's telemetry: what is switched on, the SDK of each process, and the observer that
turns finished requests into spans and metrics.

Everything is off unless asked for, and then only what was asked for:

- traces, exported over OTLP/HTTP, when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
  ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set and ``OTEL_TRACES_EXPORTER`` is not ``none``;
- metrics over OTLP likewise (``..._METRICS_ENDPOINT``, ``OTEL_METRICS_EXPORTER``);
- a Prometheus endpoint when ``CASCADE_METRICS_PORT`` is set (``CASCADE_METRICS_HOST``,
  default ``0.0.0.0``); see ``worker.telemetry.prometheus`` for how a prefork pool shares it;
- ``OTEL_SDK_DISABLED=true`` turns all of it off.

When nothing is on, no observer is registered and the SDK is never imported. Who sets up what:
each task process (pool child; the main process under the solo and threads pools) sets the
global tracer and meter providers on ``worker_process_init`` or its first task; the worker's
main process never does — children forked from it must start clean — and keeps a private meter
for the queue-depth gauges and the endpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from opentelemetry import metrics, trace

from settings import Settings
from tasks.contract.schemas import ChatReply, ChatRequest, HandOff
from worker.telemetry import tracing
from worker.telemetry.metrics import METER_NAME, CascadeMetrics, observe_redis

logger = logging.getLogger(__name__)

METRICS_PORT_ENV = "CASCADE_METRICS_PORT"
METRICS_HOST_ENV = "CASCADE_METRICS_HOST"
# Set by the main process for its pool: where task processes write their metrics.
SNAPSHOT_DIR_ENV = "CASCADE_METRICS_SNAPSHOT_DIR"


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def _otlp_on(env: Mapping[str, str], signal: str) -> bool:
    endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")
    return bool(endpoint and endpoint.strip()) and env.get(f"OTEL_{signal}_EXPORTER", "otlp").strip() != "none"


@dataclass(frozen=True)
class TelemetryConfig:
    """Which telemetry is on, read from the environment (see the module docstring)."""

    traces: bool = False
    otlp_metrics: bool = False
    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"  # noqa: S104 - a container's endpoint is scraped from outside

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TelemetryConfig:
        """The configuration in ``env`` (default: ``os.environ``)."""
        env = os.environ if env is None else env
        if _true(env.get("OTEL_SDK_DISABLED")):
            return cls()
        port = (env.get(METRICS_PORT_ENV) or "").strip()
        if port and not port.isdigit():
            raise ValueError(f"{METRICS_PORT_ENV} must be a port number, not {port!r}")
        return cls(
            traces=_otlp_on(env, "TRACES"),
            otlp_metrics=_otlp_on(env, "METRICS"),
            metrics_port=int(port) if port and int(port) > 0 else None,
            metrics_host=(env.get(METRICS_HOST_ENV) or "").strip() or cls.metrics_host,
        )

    @property
    def metrics(self) -> bool:
        """True when metrics go anywhere."""
        return self.otlp_metrics or self.metrics_port is not None

    @property
    def enabled(self) -> bool:
        """True when anything is on."""
        return self.traces or self.metrics


class TelemetryObserver:
    """The ``RequestObserver`` of ``worker.runtime``: attempt spans, hop-span attributes and
    metrics for each request that finished or was handed off on this worker.

    Uses the global tracer and meter unless given others (tests pass in-memory ones).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        tracer: trace.Tracer | None = None,
        meter: metrics.Meter | None = None,
        capture_content: bool | None = None,
    ) -> None:
        self._providers = settings.providers
        self._tracer = tracer or tracing.get_tracer()
        self.metrics = CascadeMetrics(meter or metrics.get_meter(METER_NAME))
        self._capture = tracing.capture_content_enabled() if capture_content is None else capture_content

    def _hop_attempts(self, attempts: list[Any]) -> tuple[int, int | None]:
        """Where this hop's attempts start, and when the hop started (if under a task)."""
        hop = tracing.current_hop()
        if hop is None:
            return 0, None
        hop.observed = True
        return min(hop.prior_attempts, len(attempts)), hop.started_ns

    def request_finished(self, request: ChatRequest, reply: ChatReply) -> None:
        """Spans of this hop's attempts, the outcome on the hop span, the request's metrics."""
        attempts = reply.meta.attempts
        first, started = self._hop_attempts(attempts)
        tracing.record_attempts(
            self._tracer,
            request,
            attempts[first:],
            self._providers,
            reply=reply,
            end_ns=time.time_ns(),
            not_before_ns=started,
            capture_content=self._capture,
        )
        tracing.annotate_finished(trace.get_current_span(), reply)
        self.metrics.record_attempts(attempts, first, self._providers, reply=reply, chain_continues=False)
        self.metrics.request_finished(request, reply)

    def request_handed_off(self, request: ChatRequest, state: HandOff, queue: str) -> None:
        """Spans of this hop's attempts, the hand-off on the hop span, the hand-off counted."""
        first, started = self._hop_attempts(state.attempts)
        tracing.record_attempts(
            self._tracer,
            request,
            state.attempts[first:],
            self._providers,
            reply=None,
            end_ns=time.time_ns(),
            not_before_ns=started,
        )
        tracing.annotate_handed_off(trace.get_current_span(), state, queue)
        self.metrics.record_attempts(state.attempts, first, self._providers, reply=None, chain_continues=True)
        self.metrics.request_handed_off(request, queue)

    def cooldown_tripped(self, provider_id: str) -> None:
        """Count a cooldown this worker started (never raises: it runs inside the chain)."""
        try:
            self.metrics.cooldown_tripped(provider_id)
        except Exception:
            logger.exception("could not count the cooldown of %s", provider_id)


def telemetry_observer(settings: Settings) -> TelemetryObserver | None:
    """The observer to register, or None when telemetry is off."""
    return TelemetryObserver(settings) if TelemetryConfig.from_env().enabled else None


# --- task processes ---------------------------------------------------------------------------

_lock = threading.Lock()
_process: dict[str, Any] = {}  # pid, tracer_provider, meter_provider, snapshots


def _process_label() -> str:
    from celery.utils.log import current_process_index

    index = current_process_index()
    return str(index) if index is not None else "main"


def setup_task_process(config: TelemetryConfig | None = None) -> None:
    """Set up the SDK of this task process, once per process id (a forked child sets up its
    own); does nothing when telemetry is off or the ``otel`` extra is missing."""
    if _process.get("pid") == os.getpid():
        return
    config = config or TelemetryConfig.from_env()
    with _lock:
        if _process.get("pid") == os.getpid():
            return
        _process.clear()
        _process["pid"] = os.getpid()
        if not config.enabled:
            return
        try:
            from worker.telemetry import sdk as otel_sdk
        except ImportError as exc:
            logger.warning("telemetry is configured but the SDK is missing (pip install 'cascade[otel]'): %s", exc)
            return
        if os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "").startswith("grpc"):
            logger.warning("OTEL_EXPORTER_OTLP_PROTOCOL=grpc is not supported; exporting over OTLP/HTTP")
        if config.traces and isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            _process["tracer_provider"] = provider = otel_sdk.tracer_provider()
            trace.set_tracer_provider(provider)
        readers = []
        directory = os.environ.get(SNAPSHOT_DIR_ENV)
        if config.metrics_port is not None and directory:
            from prometheus_client import CollectorRegistry

            from worker.telemetry.prometheus import SnapshotWriter

            registry = CollectorRegistry()
            readers.append(otel_sdk.prometheus_reader(registry))
            _process["snapshots"] = SnapshotWriter(Path(directory), registry, _process_label())
        if config.otlp_metrics:
            readers.append(otel_sdk.otlp_reader())
        if readers:
            _process["meter_provider"] = meter_provider = otel_sdk.meter_provider(readers)
            metrics.set_meter_provider(meter_provider)


def count_rejected(error_type: str) -> None:
    """Count a message the task refused before any provider ran (``cascade.requests.rejected``):
    it never reaches the runner, so no observer hears of it."""
    if _process.get("pid") != os.getpid() or "meter_provider" not in _process:
        return
    if "rejected" not in _process:
        meter = _process["meter_provider"].get_meter(METER_NAME)
        _process["rejected"] = meter.create_counter(
            "cascade.requests.rejected", "{request}", "Messages refused before any provider ran"
        )
    _process["rejected"].add(1, {"error_type": error_type})


def write_snapshot() -> None:
    """Write this task process's metrics for the main process's endpoint (if it has one)."""
    snapshots = _process.get("snapshots") if _process.get("pid") == os.getpid() else None
    if snapshots is not None:
        try:
            snapshots.write()
        except OSError as exc:
            logger.warning("could not write the metrics snapshot: %s", exc)


def shutdown_task_process() -> None:
    """Flush and stop this task process's providers (spans still queued are exported)."""
    if _process.get("pid") != os.getpid():
        return
    for key in ("tracer_provider", "meter_provider"):
        provider = _process.pop(key, None)
        if provider is not None:
            provider.shutdown()


# --- the main process -------------------------------------------------------------------------

_main: dict[str, Any] = {}  # meter_provider, endpoint, directory


def start_main_process(settings: Settings, client: redis.Redis, config: TelemetryConfig | None = None) -> None:
    """In the worker's main process, before the pool starts: the queue-depth gauges and, with
    ``CASCADE_METRICS_PORT``, the snapshot directory and the merged endpoint."""
    config = config or TelemetryConfig.from_env()
    if not config.metrics or _main:
        return
    try:
        from prometheus_client import CollectorRegistry

        from worker.telemetry import sdk as otel_sdk
        from worker.telemetry.prometheus import MetricsEndpoint
    except ImportError as exc:
        logger.warning("metrics are configured but the SDK is missing (pip install 'cascade[otel]'): %s", exc)
        return
    readers = []
    own = CollectorRegistry()
    if config.metrics_port is not None:
        directory = Path(tempfile.mkdtemp(prefix="cascade-metrics-"))
        os.environ[SNAPSHOT_DIR_ENV] = str(directory)  # inherited by the pool's processes
        _main["directory"] = directory
        readers.append(otel_sdk.prometheus_reader(own))
    if config.otlp_metrics:
        readers.append(otel_sdk.otlp_reader())
    provider = otel_sdk.meter_provider(readers)  # private: never the global one (see above)
    _main["meter_provider"] = provider
    queues = sorted({"chat", *(p.queue for p in settings.providers.values())})  # as worker.celery_app declares
    cooling = sorted(pid for pid, p in settings.providers.items() if p.cooldown_failures > 0)
    observe_redis(provider.get_meter(METER_NAME), client, queues, cooling)
    if config.metrics_port is not None:
        _main["endpoint"] = MetricsEndpoint(own, _main["directory"], config.metrics_host, config.metrics_port)


def stop_main_process() -> None:
    """Stop the endpoint, flush the main process's metrics, remove the snapshot directory."""
    endpoint = _main.pop("endpoint", None)
    if endpoint is not None:
        endpoint.stop()
    provider = _main.pop("meter_provider", None)
    if provider is not None:
        provider.shutdown()
    directory = _main.pop("directory", None)
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)
        os.environ.pop(SNAPSHOT_DIR_ENV, None)
