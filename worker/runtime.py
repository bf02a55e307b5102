"""Per-process state of a worker: settings, the Redis client and the warm providers.

Built lazily on first use, so a prefork child opens its own connections after the fork and a
parent process never builds a provider (nor initialises a GPU) it would then fork.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from providers.registry import ProviderPool
from settings import Settings, load_settings
from tasks.contract.schemas import ChatReply, ChatRequest, HandOff
from worker.state.cooldown import RedisCooldowns
from worker.state.store import DeadLetters, ReplyStore
from worker.telemetry.observer import telemetry_observer


class RequestObserver(Protocol):
    """Something that watches finished requests (telemetry): called after the reply is
    stored or the request handed off, never on the path of a chunk."""

    def request_finished(self, request: ChatRequest, reply: ChatReply) -> None:
        """The request ended with ``reply`` on this worker."""

    def request_handed_off(self, request: ChatRequest, state: HandOff, queue: str) -> None:
        """The request continues on ``queue`` with ``state``."""


@dataclass
class WorkerRuntime:
    """What a task needs besides its request."""

    settings: Settings
    redis: redis.Redis
    replies: ReplyStore
    dead_letters: DeadLetters
    providers: ProviderPool
    cooldowns: RedisCooldowns
    worker_name: str
    observers: list[RequestObserver] = field(default_factory=list)


T = TypeVar("T")


def once_per_process(build: Callable[[], T]) -> Callable[[], T]:
    """``build`` run once, however many threads ask at once: a threads pool's first requests
    arrive together, and ``functools.cache`` would let each of them build its own (a runtime
    each, models loaded each). As with ``functools.cache``, a forked child keeps what its parent
    built."""
    state: dict[str, Any] = {"lock": threading.Lock()}

    def new_lock_in_child() -> None:  # a thread of the parent may have held it at the fork
        state["lock"] = threading.Lock()

    os.register_at_fork(after_in_child=new_lock_in_child)

    @functools.wraps(build)
    def get() -> T:
        if "value" not in state:
            with state["lock"]:
                if "value" not in state:
                    state["value"] = build()
        value: T = state["value"]
        return value

    return get


@once_per_process
def get_settings() -> Settings:
    """The settings of this process, loaded once (raises ``ConfigError``)."""
    return load_settings()


# A command that finds Redis gone is tried again for about 3.5 s (0.1 s doubling to 1 s), so a
# restart with AOF rides through without aborting running requests; longer outages still end
# the run, and its lease (TTL well above this) lapses for a reaper to resend it. Explicit
# because redis-py's default differs between versions (one retry in 5.x, ten in 8.x).
# https://redis.readthedocs.io/en/stable/retry.html
REDIS_RETRY = Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=6)


def redis_client(settings: Settings) -> redis.Redis:
    """A Redis client for ``settings.redis_url`` that survives Redis restarts and notices a
    Redis gone silent: with a socket timeout (``Settings.redis_socket_options``) a command on a
    dead connection fails after that long and is tried again on a new one, instead of waiting
    forever with the request thread, the lease renewals or the reaper. No command sent with it
    blocks on the server (no BRPOP, no XREAD BLOCK), so the timeout never cuts a live one."""
    return redis.Redis.from_url(
        settings.redis_dsn,
        **settings.redis_socket_options,
        retry=REDIS_RETRY,
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


def build_runtime(settings: Settings, client: redis.Redis, worker_name: str | None = None) -> WorkerRuntime:
    """A runtime on ``client`` (tests pass a fakeredis client here), with the telemetry observer
    when telemetry is on (``worker.telemetry.observer``)."""
    telemetry = telemetry_observer(settings)
    return WorkerRuntime(
        settings=settings,
        redis=client,
        replies=ReplyStore(client, settings.reply_ttl_s),
        dead_letters=DeadLetters(client, settings.dead_letter_maxlen, settings.dead_letter_ttl_s),
        providers=ProviderPool(settings.providers),
        cooldowns=RedisCooldowns(client, on_trip=telemetry.cooldown_tripped if telemetry else None),
        # Built in the child after the fork, so the pid names the process that ran the request.
        worker_name=worker_name or settings.worker_name or f"{socket.gethostname()}/{os.getpid()}",
        observers=[telemetry] if telemetry else [],
    )


@once_per_process
def get_runtime() -> WorkerRuntime:
    """The runtime of this process, built on first use."""
    settings = get_settings()
    return build_runtime(settings, redis_client(settings))
