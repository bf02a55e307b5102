"""Recording a sent request as pending, so a reaper can resend it if its message is lost.

kombu's Redis transport takes a message off its queue before it records it as unacknowledged;
a worker killed in between leaves it nowhere in Redis. Whoever sends a ``cascade.chat`` message
therefore records it (``cascade:pending`` and ``cascade:pending:{id}``): the producer client
after each submit, a worker before it hands a request to another queue. The worker's reply
script ends the record, and the reaper (``worker.state.pending``) resends a request that stays
pending with no message anywhere.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from tasks.contract import keys
from tasks.contract.schemas import TASK_NAME

# How long a record outlives a request that never ends (a queue nobody consumes).
PENDING_TTL_S = 7 * 86_400


def note_sent(
    client: redis.Redis,
    request_id: str,
    queue: str,
    kwargs: dict[str, Any],
    *,
    keep_existing: bool = False,
    task: str = TASK_NAME,
) -> None:
    """Record that a ``task`` message for ``request_id`` was sent to ``queue`` (one round trip).
    ``keep_existing``: leave a record that is there already alone (the producer writes after its
    send, and a worker may already have handed the request on)."""
    pipe = client.pipeline(transaction=True)
    record = json.dumps({"queue": queue, "kwargs": kwargs, "task": task})
    pipe.set(keys.pending_record(request_id), record, ex=PENDING_TTL_S, nx=keep_existing)
    pipe.zadd(keys.PENDING_SET, {request_id: now_ms()}, nx=keep_existing)
    pipe.execute()


def now_ms() -> int:
    """Wall-clock time in milliseconds, the score of pending records."""
    return int(time.time() * 1000)
