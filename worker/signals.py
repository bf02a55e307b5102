"""Every Celery signal a Cascade worker answers, connected in one place (the Celery app
includes this module):

- ``worker_process_init`` (each pool process): warm up the providers of the queues this worker
  consumes (below); set up the telemetry SDK (``worker.telemetry.hooks``); then freeze what
  is on the heap (``freeze_warm_heap``).
- ``worker_ready`` (main process): publish each chain's entry queue so producers can route
  requests straight to it; start the reaper.
- ``worker_init`` / ``worker_shutdown`` (main process), ``worker_process_shutdown``: the metrics
  endpoint, queue gauges and the SDK's flush.
- ``task_prerun`` / ``task_postrun``: the hop span and the request id of log records around
  each task, then the process's metrics snapshot.
- ``setup_logging`` / ``celeryd_init`` (with ``CASCADE_LOG_FORMAT=json``): JSON lines, no banner.
- ``before_task_publish``: the limits of this process's own app stay out of the messages it
  sends (``worker.celery_app``); the trace context goes in (``tasks.producer.tracing``).

Providers are built in ``worker_process_init``, i.e. in each pool process after the fork: the
parent never imports torch or initialises CUDA, which forked children could not use. A local
model is loaded there; an API provider imports its SDK and builds its client there (``import
openai`` alone takes most of a second), while the parent is still connecting to the broker,
instead of on the first request. Pools that run tasks in the main process without sending
``worker_process_init`` (threads, and the green pools) warm up in ``worker_ready`` instead,
before the consumer takes its first message.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

from celery import Celery
from celery.signals import (
    before_task_publish,
    celeryd_init,
    setup_logging,
    task_postrun,
    task_prerun,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

from tasks.contract.keys import ROUTES
from worker.celery_app import no_time_limits_in_messages
from worker.runtime import get_runtime
from worker.state.deaths import RunEnds
from worker.state.reaper import Reaper
from worker.state.session import CelerySender
from worker.telemetry import hooks

logger = logging.getLogger(__name__)

ROUTES_TTL_S = 7 * 86_400


def consumed_queues(app: Celery) -> frozenset[str]:
    """The queues the worker process consumes (all known queues if none were selected)."""
    return frozenset(app.amqp.queues.consume_from or app.amqp.queues)


def warm_up_providers(**_: Any) -> None:
    """Build every provider served on a queue this worker consumes. A provider that cannot be
    built is logged and left to fail its requests with a clear error: a pool process that died
    here would only be started again, and die again."""
    from worker.celery_app import app

    runtime = get_runtime()
    queues = consumed_queues(app)
    for provider_id, config in runtime.settings.providers.items():
        if config.queue not in queues:
            continue
        logger.info("warming up %s on queue %s", provider_id, config.queue)
        try:
            runtime.providers.get(provider_id)
        except Exception:
            logger.exception("could not warm up %s; its requests will report why", provider_id)


# The pools whose task processes send worker_process_init (prefork's children, solo's main).
_POOLS_WITH_PROCESS_INIT = frozenset({"celery.concurrency.prefork", "celery.concurrency.solo"})


def sends_process_init(pool: Any) -> bool:
    """Whether ``pool`` (a worker's task pool) sends ``worker_process_init`` where tasks run."""
    return type(pool).__module__ in _POOLS_WITH_PROCESS_INIT


def warm_up_in_main_process(sender: Any = None, **_: Any) -> None:
    """``worker_ready``: warm the providers up here when the pool runs tasks in this process and
    sends no ``worker_process_init`` (``-P threads``); the pool's threads share what is built."""
    pool = getattr(sender, "pool", None)
    if pool is not None and not sends_process_init(pool):
        warm_up_providers()
        freeze_warm_heap()


def freeze_warm_heap(**_: Any) -> None:
    """Move every object alive after warm-up (modules, SDK clients and their types, settings,
    a model's Python side) out of the garbage collector's reach (``gc.freeze``). They live as
    long as the process, yet a full collection walks them all, and one that falls inside a
    request stalls its tokens for as long as the walk takes; frozen, a collection walks only
    what requests allocated since. Nothing is collected first: the walk would delay the
    process's first request, to free the few cycles warm-up leaves behind.
    https://docs.python.org/3/library/gc.html#gc.freeze"""
    gc.freeze()


def start_reaper(**_: Any) -> None:
    """Start this worker's reaper (main process only): it resends requests whose worker died."""
    from worker.celery_app import app

    runtime = get_runtime()
    sender = CelerySender(app)  # the same sender as the task's hand-offs

    def give_up(request_id: str, record: dict[str, Any]) -> None:
        runtime.dead_letters.push(
            "lost_too_often",
            "the request's message was lost after every resend; it is not sent again",
            body=record.get("kwargs"),
            request_id=request_id,
            queue=record.get("queue"),
        )

    Reaper(
        runtime.redis, sender.resend, runtime.settings.reaper_interval_s, give_up=give_up, ends=RunEnds.of(runtime)
    ).start()


def publish_chain_routes(**_: Any) -> None:
    """Write ``cascade:routes`` (chain name -> queue of its first provider, image chains as chat
    chains), replacing what was
    there in one MULTI: a chain this configuration no longer has loses its route, so producers
    stop sending it to a queue that may have no consumer left, and the hash is never seen
    empty. Every worker of a deployment shares one chain table; during a rolling deploy the
    routes are those of the worker that started last."""
    runtime = get_runtime()
    routes = {name: runtime.settings.queue_of(ids[0]) for name, ids in runtime.settings.chains.items()}
    if not routes:
        return
    pipe = runtime.redis.pipeline(transaction=True)
    pipe.delete(ROUTES)
    for name, queue in routes.items():
        pipe.hset(ROUTES, name, queue)
    pipe.expire(ROUTES, ROUTES_TTL_S)
    pipe.execute()


worker_process_init.connect(warm_up_providers, weak=False)
worker_ready.connect(warm_up_in_main_process, weak=False)  # first: the routes go out once it is warm
worker_ready.connect(publish_chain_routes, weak=False)
worker_ready.connect(start_reaper, weak=False)
before_task_publish.connect(no_time_limits_in_messages, weak=False)
if hooks.prepare_logging():
    setup_logging.connect(hooks.configure_logging, weak=False)
    celeryd_init.connect(hooks.quiet_banner, weak=False)
worker_init.connect(hooks.start_main_process, weak=False)
worker_shutdown.connect(hooks.stop_main_process, weak=False)
worker_process_init.connect(hooks.setup_task_process, weak=False)
worker_process_init.connect(freeze_warm_heap, weak=False)  # last: after everything warm-up builds
worker_process_shutdown.connect(hooks.shutdown_task_process, weak=False)
task_prerun.connect(hooks.task_started, weak=False)
task_postrun.connect(hooks.task_finished, weak=False)
