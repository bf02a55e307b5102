"""Worker start-up hooks: warm the local models of the queues this worker consumes, and
publish each chain's entry queue so producers can route requests straight to it.

Models are loaded in ``worker_process_init``, i.e. in each pool process after the fork: the
parent never imports torch or initialises CUDA, which forked children could not use.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_ready

from tasks.keys import ROUTES
from tasks.schemas import TASK_NAME
from worker.reaper import Reaper
from worker.runtime import get_runtime

logger = logging.getLogger(__name__)

ROUTES_TTL_S = 7 * 86_400


def consumed_queues(app: Celery) -> frozenset[str]:
    """The queues the worker process consumes (all known queues if none were selected)."""
    return frozenset(app.amqp.queues.consume_from or app.amqp.queues)


def warm_up_local_models(**_: Any) -> None:
    """Load every ``hf_local`` model served on a queue this worker consumes."""
    from worker.celery_app import app

    runtime = get_runtime()
    queues = consumed_queues(app)
    for provider_id, config in runtime.settings.providers.items():
        if config.type == "hf_local" and config.queue in queues:
            logger.info("warming up %s on queue %s", provider_id, config.queue)
            runtime.providers.get(provider_id)


def start_reaper(**_: Any) -> None:
    """Start this worker's reaper (main process only): it resends requests whose worker died."""
    from worker.celery_app import app

    runtime = get_runtime()

    def resend(queue: str, kwargs: dict[str, Any]) -> None:
        app.send_task(TASK_NAME, kwargs=kwargs, queue=queue)

    Reaper(runtime.redis, resend, runtime.settings.reaper_interval_s).start()


def publish_chain_routes(**_: Any) -> None:
    """Write ``cascade:routes`` (chain name -> queue of its first provider)."""
    runtime = get_runtime()
    routes = {name: runtime.settings.queue_of(ids[0]) for name, ids in runtime.settings.chains.items()}
    if not routes:
        return
    pipe = runtime.redis.pipeline(transaction=True)
    for name, queue in routes.items():
        pipe.hset(ROUTES, name, queue)
    pipe.expire(ROUTES, ROUTES_TTL_S)
    pipe.execute()


worker_process_init.connect(warm_up_local_models, weak=False)
worker_ready.connect(publish_chain_routes, weak=False)
worker_ready.connect(start_reaper, weak=False)
