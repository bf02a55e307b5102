"""The Celery app of a Cascade worker: JSON only, late acks, one message at a time.

``celery -A worker worker -Q chat`` finds ``app`` here through ``worker/__init__.py``.
Settings come from ``CASCADE_*`` and ``CASCADE_CONFIG``; a bad config stops the worker at
start with a message naming the bad key.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery import Celery
from kombu.entity import Queue

from settings import ConfigError, Settings
from tasks.contract.schemas import DEFAULT_QUEUE
from worker.boundary.envelope import CASCADE_TASKS
from worker.runtime import get_settings

logger = logging.getLogger(__name__)


def create_app(settings: Settings) -> Celery:
    """A Celery app configured from ``settings``."""
    app = Celery("cascade", include=["tasks.chat", "tasks.image", "worker.signals"])
    queues = sorted(settings.task_queues)
    _OWN_TIME_LIMITS.add((settings.hard_time_limit_s, settings.task_soft_time_limit_s))
    app.conf.update(
        broker_url=settings.redis_dsn,
        # kombu's Redis transport with every queue entry screened before it is decoded: a
        # message that is not one of Cascade's plain task messages ends in cascade:dead (and a
        # failed reply where it names a request id) instead of stopping the consumer. The URL
        # still decides the host, the password and TLS (rediss://, ssl_* query parameters).
        broker_transport="worker.boundary.transport:Transport",
        result_backend=settings.redis_dsn,
        # JSON only: a pickle message is refused before it is decoded.
        # https://docs.celeryq.dev/en/stable/userguide/security.html#serializers
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_default_queue=DEFAULT_QUEUE,
        task_queues=[Queue(name) for name in queues],  # type: ignore[no-untyped-call]
        task_routes={name: {"queue": DEFAULT_QUEUE} for name in sorted(CASCADE_TASKS)},
        # Ack after the task ran, and requeue if the worker process dies, so a crash never
        # loses a request; idempotency by request_id makes the rerun safe.
        # https://docs.celeryq.dev/en/stable/userguide/configuration.html#task-acks-late
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # LLM requests are long: one reserved message per process keeps the rest in Redis for
        # idle workers. https://docs.celeryq.dev/en/stable/userguide/optimizing.html#prefetch-limits
        worker_prefetch_multiplier=1,
        # An unacked message is redelivered after the visibility timeout: keep it above the
        # hard time limit or long requests run twice (celery/celery#5935).
        # https://docs.celeryq.dev/en/stable/getting-started/backends-and-brokers/redis.html#visibility-timeout
        broker_transport_options={"visibility_timeout": settings.broker_visibility_timeout_s},
        result_backend_transport_options={"visibility_timeout": settings.broker_visibility_timeout_s},
        # The request's own deadline fires first; the soft limit ends the request cleanly
        # (a failed reply, never a fallback) and the hard limit is the last resort.
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_time_limit=settings.hard_time_limit_s,
        result_expires=settings.reply_ttl_s,
        broker_connection_retry_on_startup=True,
        # Keep running requests when the broker connection drops: the redelivered copy finds
        # the request's lease held (or its reply stored) and is dropped, so nothing runs twice.
        # https://docs.celeryq.dev/en/stable/userguide/configuration.html#worker-cancel-long-running-tasks-on-connection-loss
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # Soft shutdown (SIGQUIT, or SIGTERM with REMAP_SIGTERM=SIGQUIT): running requests get
        # this long to finish; the rest are cancelled and their leases lapse, so the reaper of a
        # surviving worker sends them again.
        # https://docs.celeryq.dev/en/stable/userguide/workers.html#soft-shutdown
        worker_soft_shutdown_timeout=settings.soft_shutdown_s,
        worker_enable_soft_shutdown_on_idle=True,
        # A pool process loads its models (worker.signals) before it reports up; Celery's 4 s
        # default would kill it mid-load, again and again.
        # https://docs.celeryq.dev/en/stable/userguide/configuration.html#worker-proc-alive-timeout
        worker_proc_alive_timeout=settings.warm_up_timeout_s,
        # A safety net behind the transport's screen: whatever Celery's consumer still refuses
        # is dead-lettered too, never only logged.
        worker_consumer="worker.boundary.consumer:DeadLetteringConsumer",
        task_track_started=False,
        worker_hijack_root_logger=False,
    )
    return app


# The [hard, soft] limits of the apps create_app built in this process.
_OWN_TIME_LIMITS: set[tuple[float, float]] = set()


def no_time_limits_in_messages(sender: Any = None, headers: Any = None, **_: Any) -> None:
    """Celery writes a sending app's ``task_time_limit`` into every message it sends of a task
    it has registered (a worker's hand-offs and resends); workers refuse a message that carries
    time limits (``worker.boundary.envelope``), since the consuming worker's configuration decides them.
    Only the limits of this process's own Cascade app are left out: any other sender's stay,
    and are refused."""
    if sender not in CASCADE_TASKS or not isinstance(headers, dict):
        return
    limits = headers.get("timelimit")
    if isinstance(limits, (list, tuple)) and len(limits) == 2 and tuple(limits) in _OWN_TIME_LIMITS:
        headers["timelimit"] = [None, None]


def _load() -> Settings:
    try:
        return get_settings()
    except ConfigError as exc:
        print(f"cascade: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


app = create_app(_load())
