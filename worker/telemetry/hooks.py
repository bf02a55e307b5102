"""The receivers of Celery's signals for logs, traces and metrics; ``worker.signals`` connects them.

- ``setup_logging`` (only with ``CASCADE_LOG_FORMAT=json``): JSON lines on stderr instead of
  Celery's format; Celery then leaves logging alone. ``celeryd_init`` drops the text banner.
- Celery's task records lose their args, kwargs and return value (``worker.telemetry.logs``), always.
- ``worker_init`` / ``worker_shutdown`` (main process): metrics endpoint and queue gauges.
- ``worker_process_init`` / ``worker_process_shutdown`` (each pool process): the SDK.
- ``task_prerun`` / ``task_postrun``: the hop span and the request id of the log records
  around each task; afterwards the process's metrics snapshot.
"""

from __future__ import annotations

import logging
from contextvars import Token
from typing import Any

from worker.telemetry import logs, tracing
from worker.telemetry import observer as telemetry

logger = logging.getLogger(__name__)

# Task id -> what task_postrun must undo. A dict, not a context variable: Celery sends the two
# signals from separate calls (in the same thread, so the contexts they restore are right).
_running: dict[str, tuple[tracing.Hop, Token[str | None]]] = {}


def configure_logging(loglevel: int | str | None = None, **_: Any) -> None:
    """``setup_logging`` receiver: JSON lines at Celery's ``--loglevel``."""
    logs.configure_json_logging(loglevel or logging.INFO)


def quiet_banner(instance: Any = None, **_: Any) -> None:
    """``celeryd_init`` (JSON logs only): no start-up banner, which Celery prints as plain text
    on stdout; the same as ``celery -q``, so every line a worker writes is JSON."""
    if instance is not None:
        instance.quiet = True


def start_main_process(**_: Any) -> None:
    """``worker_init``: the main process's metrics (endpoint, queue depth)."""
    config = telemetry.TelemetryConfig.from_env()
    if not config.metrics:
        return
    from worker.runtime import get_settings, redis_client

    settings = get_settings()
    telemetry.start_main_process(settings, redis_client(settings), config)


def stop_main_process(**_: Any) -> None:
    """``worker_shutdown``: stop the endpoint and remove the snapshots; flush the spans of a
    main process that ran tasks itself (solo and threads pools send no process shutdown)."""
    telemetry.stop_main_process()
    telemetry.shutdown_task_process()


def setup_task_process(**_: Any) -> None:
    """``worker_process_init``: this pool process's SDK, and its first (empty) snapshot."""
    telemetry.setup_task_process()
    telemetry.write_snapshot()


def shutdown_task_process(**_: Any) -> None:
    """``worker_process_shutdown``: export what is still queued."""
    telemetry.shutdown_task_process()


def task_started(task_id: str | None = None, task: Any = None, kwargs: Any = None, **_: Any) -> None:
    """``task_prerun``: open the hop span, tag the log records with the request id."""
    if task_id is None:
        return
    telemetry.setup_task_process()  # pools that send no worker_process_init (threads)
    hop = tracing.start_hop(getattr(task, "request", None), task_id, kwargs)
    _running[task_id] = (hop, logs.bind_request(hop.request_id))


def task_finished(task_id: str | None = None, retval: Any = None, **_: Any) -> None:
    """``task_postrun``: close the hop span, count a rejected message, write the snapshot."""
    running = _running.pop(task_id, None) if task_id is not None else None
    if running is None:
        return
    hop, log_token = running
    try:
        if not hop.observed and isinstance(retval, dict) and retval.get("status") == "failed":
            error = retval.get("error")
            telemetry.count_rejected(str(error.get("type") if isinstance(error, dict) else "unknown"))
        tracing.end_hop(hop, retval)
    finally:
        logs.unbind_request(log_token)
        telemetry.write_snapshot()


def prepare_logging() -> bool:
    """Install the task-data filter on Celery's task records, always, and switch to JSON lines
    now (not only when Celery sets logging up, so warnings printed before that are JSON too)
    when ``CASCADE_LOG_FORMAT=json``; True in that case."""
    logs.install_task_data_filter()
    if not logs.json_logs_requested():
        return False
    logs.configure_json_logging()
    return True
