"""One Prometheus scrape endpoint per worker, whatever its pool.

OpenTelemetry metrics live in the process that records them, and a prefork worker runs its
requests in several pool processes that cannot all listen on one port. So each task process
writes its metrics, in the Prometheus text format, to a file of its own in a directory the
worker's main process created (``SnapshotWriter.write``, after every task: cheap next to an
LLM call, and a counter only changes when a task ends). The main process serves
``CASCADE_METRICS_PORT``; each scrape merges its own metrics (the queue-depth gauges) with the
files of the pool processes that are still alive, adding the label ``worker_process`` (the
pool index, stable when Celery replaces a process, or ``main``). A dead process's file is
removed, so its series end as a restarted target's would. ``sum by (...)`` aggregates a worker.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

PROCESS_LABEL = "worker_process"
_SUFFIX = ".prom"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SnapshotWriter:
    """Writes one task process's metrics to ``{directory}/{label}.{pid}.prom``."""

    def __init__(self, directory: Path, registry: CollectorRegistry, label: str) -> None:
        self.path = directory / f"{label}.{os.getpid()}{_SUFFIX}"
        self._registry = registry
        self._lock = threading.Lock()  # a threads pool may finish two tasks at once

    def write(self) -> None:
        """Replace the file atomically with the current values."""
        with self._lock:
            temporary = self.path.with_suffix(".tmp")
            temporary.write_bytes(generate_latest(self._registry))
            temporary.replace(self.path)


class MergedCollector(Collector):
    """The main process's own registry plus the snapshots of the live pool processes."""

    def __init__(self, own: CollectorRegistry, directory: Path) -> None:
        self._own = own
        self._directory = directory

    def _sources(self) -> Iterable[tuple[str, str]]:
        yield "main", generate_latest(self._own).decode()
        for path in sorted(self._directory.glob(f"*{_SUFFIX}")):
            label, _, pid = path.name.removesuffix(_SUFFIX).rpartition(".")
            if not pid.isdigit() or not _alive(int(pid)):
                path.unlink(missing_ok=True)
                continue
            try:
                yield label, path.read_text()
            except OSError:  # replaced or removed between the listing and the read
                continue

    def collect(self) -> Iterable[Metric]:
        """Every family once, each sample labelled with the process it came from."""
        families: dict[str, Metric] = {}
        for label, text in self._sources():
            for family in text_string_to_metric_families(text):
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                merged.samples.extend(
                    sample._replace(labels={**sample.labels, PROCESS_LABEL: label}) for sample in family.samples
                )
        return list(families.values())


class MetricsEndpoint:
    """The HTTP server of the main process (``/metrics`` on ``host:port``)."""

    def __init__(self, own: CollectorRegistry, directory: Path, host: str, port: int) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(MergedCollector(own, directory))
        self.server, self._thread = start_http_server(port, addr=host, registry=registry)
        logger.info("metrics on http://%s:%d/metrics", host, port)

    def stop(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()
