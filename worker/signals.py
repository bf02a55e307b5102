"""Worker start-up hooks: warm up the providers of the queues this worker consumes, and
publish each chain's entry queue so producers can route requests straight to it.

Providers are built in ``worker_process_init``, i.e. in each pool process after the fork: the
parent never imports torch or initialises CUDA, which forked children could not use. A local
model is loaded there; an API provider imports its SDK and builds its client there (``import
openai`` alone takes most of a second), while the parent is still connecting to the broker,
instead of on the first request. Pools that run tasks in the main process without sending
``worker_process_init`` (threads, and the green pools) warm up in ``worker_ready`` instead,
before the consumer takes its first message.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_ready

from tasks.contract.keys import ROUTES
from tasks.contract.schemas import REQUEST_ID_HEADER, TASK_NAME
from worker.runtime import get_runtime
from worker.state.deaths import RunEnds
from worker.state.pending import request_id_in
from worker.state.reaper import Reaper

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


def start_reaper(**_: Any) -> None:
    """Start this worker's reaper (main process only): it resends requests whose worker died."""
    from worker.celery_app import app

    runtime = get_runtime()

    def resend(queue: str, kwargs: dict[str, Any]) -> None:
        request_id = request_id_in(kwargs)
        headers = {REQUEST_ID_HEADER: request_id} if request_id is not None else {}
        app.send_task(TASK_NAME, kwargs=kwargs, queue=queue, headers=headers)

    def give_up(request_id: str, record: dict[str, Any]) -> None:
        runtime.dead_letters.push(
            "lost_too_often",
            "the request's message was lost after every resend; it is not sent again",
            body=record.get("kwargs"),
            request_id=request_id,
            queue=record.get("queue"),
        )

    Reaper(runtime.redis, resend, runtime.settings.reaper_interval_s, give_up=give_up, ends=RunEnds.of(runtime)).start()


def publish_chain_routes(**_: Any) -> None:
    """Write ``cascade:routes`` (chain name -> queue of its first provider), replacing what was
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
