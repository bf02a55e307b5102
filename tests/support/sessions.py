"""Runs opened the real way (``worker.state.session.RunSession``, its Lua on fakeredis or a real
Redis), for tests that need a request held by a worker."""

from __future__ import annotations

import time
from typing import Any

import redis

from providers.timer import TIMER, Timer
from worker.state.session import RunSession, TaskSender
from worker.state.store import ReplyStore


def session_for(
    client: redis.Redis,
    request_id: str,
    *,
    worker: str = "w/1",
    sender: TaskSender | None = None,
    timer: Timer = TIMER,
    **options: Any,
) -> RunSession:
    """A session of ``worker`` for ``request_id`` with small test settings (``options`` override)."""
    settings: dict[str, Any] = {
        "lease_ttl_s": 30,
        "record_ttl_s": 60,
        "events_maxlen": 100,
        "events_ttl_s": 600,
        **options,
    }
    return RunSession(
        client, request_id, replies=ReplyStore(client, 3_600), worker=worker, sender=sender, timer=timer, **settings
    )


def opened(
    client: redis.Redis,
    request_id: str,
    kwargs: dict[str, Any] | None = None,
    *,
    queue: str = "chat",
    window: tuple[float, float] | None = None,
    start_chain: str | None = None,
    **options: Any,
) -> RunSession:
    """A session that opened its run: it holds the request's lease (close it when done)."""
    session = session_for(client, request_id, **options)
    now = time.time()
    opening = session.open(
        queue,
        kwargs if kwargs is not None else {"request": {"request_id": request_id}},
        window=window or (now, now + 300),
        start_chain=start_chain,
        cooldown_key=None,
    )
    assert opening is not None, f"{request_id} is held by another worker"
    return session
