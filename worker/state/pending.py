"""Requests sent and not answered yet: the record that closes the gap in kombu's Redis transport.

kombu's Redis transport takes a message off its queue (BRPOP) before it records the message as
unacknowledged (the ``unacked`` hash). A worker killed between the two, or with the BRPOP reply
still unread in its socket, leaves the message nowhere in Redis: no queue entry, no unacked
entry, no lease — and the broker's visibility timeout cannot restore what it never recorded.

So whoever sends a Cascade task message (``cascade.chat``, ``cascade.image``) records it: the
producer client after each submit, a worker before it hands a request to another queue.
``cascade:pending`` (sorted set: request id -> when its message was last sent, in ms) indexes
``cascade:pending:{id}`` (the queue, the task's keyword arguments and the task's name; a record
that names no task is a ``cascade.chat`` message's). The Lua script that stores the reply
(``worker.state.publisher``) removes both, so a request is pending exactly until it is answered.

One reaper at a time sweeps (``lead_sweep``); each of its passes (``resend_lost``) looks at
requests pending for longer than ``older_than_s``.
One with no lease and no reply whose message is neither on its queue nor in ``unacked`` (one
atomic read of both) is a suspect; still a suspect at the next pass with nothing sent for it
meanwhile, it was lost and is sent again (the reaper that wins a compare-and-set on its score).
A second pass is asked for because a message in flight between BRPOP and ``unacked`` looks lost
for an instant. A copy delivered twice runs once: the lease and the stored reply drop the other.

Requests enqueued by producers that do not write this record (other languages, plain Celery)
keep the other guards (leases, the unacked sweep) and the broker's visibility timeout.
"""

from __future__ import annotations

import base64
import json
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import redis

from tasks.contract import keys
from tasks.contract.schemas import REQUEST_ID_HEADER, TASK_NAME
from tasks.producer.pending import PENDING_TTL_S as PENDING_TTL_S
from tasks.producer.pending import note_sent as note_sent
from tasks.producer.pending import now_ms
from worker.boundary.envelope import CASCADE_TASKS
from worker.state import lua

logger = logging.getLogger(__name__)

PENDING_SET = keys.PENDING_SET
RESENDS = keys.RESENDS
SWEEPER = keys.SWEEPER
UNACKED = keys.UNACKED

# Sends a message again: (queue, keyword arguments, task name).
Resend = Callable[[str, dict[str, Any], str], None]
GiveUp = Callable[[str, dict[str, Any]], None]

# A request resent this many times and lost again is not sent again: it is dead-lettered.
MAX_RESENDS = 5

record_key = keys.pending_record


def task_of(record: dict[str, Any]) -> str | None:
    """The task a record (in flight or pending) was sent as: its ``task``, ``cascade.chat``
    when it names none; None when it names a task that is not Cascade's (it is not resent)."""
    task = record.get("task", TASK_NAME)
    return task if isinstance(task, str) and task in CASCADE_TASKS else None


def task_kwargs(message: Any) -> dict[str, Any] | None:
    """The keyword arguments of a kombu message (as stored in Redis, decoded from JSON) if it
    is a message of one of Cascade's tasks with a readable body; else None."""
    try:
        headers = message.get("headers") or {}
        if headers.get("task") not in CASCADE_TASKS:
            return None
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        _args, kwargs, _embed = json.loads(body)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return None
    return kwargs if isinstance(kwargs, dict) else None


def request_id_in(kwargs: dict[str, Any] | None) -> str | None:
    """The request id in a Cascade task message's keyword arguments (its ``request`` an
    object or JSON text), or None."""
    request = (kwargs or {}).get("request")
    try:
        request = json.loads(request) if isinstance(request, str) else request
    except (ValueError, RecursionError):
        return None
    found = request.get("request_id") if isinstance(request, dict) else None
    return found if isinstance(found, str) else None


def _ids_in(raw_messages: Iterable[Any], *, unacked: bool) -> set[str]:
    """The request ids of the messages of a queue (``LRANGE``) or of ``unacked`` (``HVALS``):
    from the header Cascade's senders set, else from the decoded body."""
    found = set()
    for raw in raw_messages:
        try:
            decoded = json.loads(raw)
            message = decoded[0] if unacked else decoded
        except (ValueError, TypeError, KeyError, IndexError):
            continue
        headers = message.get("headers") if isinstance(message, dict) else None
        header = headers.get(REQUEST_ID_HEADER) if isinstance(headers, dict) else None
        request_id = header if isinstance(header, str) else request_id_in(task_kwargs(message))
        if request_id is not None:
            found.add(request_id)
    return found


def resend_lost(
    client: redis.Redis,
    resend: Resend,
    *,
    older_than_s: float,
    suspects: dict[str, float],
    give_up: GiveUp | None = None,
    batch: int = 200,
    max_batches: int = 10,
    scan_limit: int = 1_000,
) -> list[str]:
    """One pass (see the module docstring): resend requests found lost at this pass and the
    last one, update ``suspects`` (request id -> pending score) for the next, and return the
    ids resent. Records are read oldest first, up to ``max_batches`` of ``batch``. A queue
    longer than ``scan_limit`` is read only at its head (the end BRPOP takes from, where old
    messages are); a request not seen there is left alone. A request lost again after
    ``MAX_RESENDS`` resends goes to ``give_up`` (a dead letter) instead, and stops being pending."""
    candidates = _unleased(client, now_ms() - older_than_s * 1000, batch, max_batches)
    lost = _not_queued(client, candidates, scan_limit) if candidates else {}
    resent = []
    for request_id, (score, record) in lost.items():
        if suspects.get(request_id) != score:
            continue  # first sighting: a message can be between BRPOP and unacked for an instant
        claimed = lua.CLAIM_LOST.call(
            client,
            keys={
                "pending_set": PENDING_SET,
                "lease_key": keys.lease_key(request_id),
                "reply_key": keys.reply_key(request_id),
                "pending_record": record_key(request_id),
                "inflight_record": keys.inflight_record(request_id),
                "resends": RESENDS,
            },
            args={"request_id": request_id, "seen_score": score, "now_ms": now_ms(), "pending_ttl_s": PENDING_TTL_S},
        )
        if claimed is None:
            continue  # it started, ended, or another reaper sent it
        if int(claimed[1]) > MAX_RESENDS:
            logger.error("request %s: lost %d times; giving up on it", request_id, MAX_RESENDS + 1)
            forget(client, request_id)
            if give_up is not None:
                give_up(request_id, record)
            continue
        logger.warning(
            "request %s: its message was lost before any worker recorded it; sending it to %s again",
            request_id,
            record["queue"],
        )
        resend(record["queue"], record["kwargs"], task_of(record) or TASK_NAME)
        resent.append(request_id)
    suspects.clear()
    suspects.update({request_id: score for request_id, (score, _r) in lost.items() if request_id not in resent})
    return resent


def lead_sweep(client: redis.Redis, token: str, hold_s: float) -> bool:
    """True if the reaper with ``token`` is (or now becomes) the one sweeping pending records,
    for ``hold_s`` from now; a sweeper that stops renewing is replaced once that passes."""
    return bool(
        lua.LEAD_SWEEP.call(client, keys={"sweeper": SWEEPER}, args={"token": token, "hold_ms": int(hold_s * 1000)})
    )


def forget(client: redis.Redis, *request_ids: str) -> None:
    """Stop tracking ``request_ids`` (they ended, or were given up on); one round trip."""
    if not request_ids:
        return
    pipe = client.pipeline(transaction=True)
    pipe.zrem(PENDING_SET, *request_ids)
    pipe.delete(*(record_key(request_id) for request_id in request_ids))
    pipe.hdel(RESENDS, *request_ids)
    pipe.execute()


def _unleased(
    client: redis.Redis, ceil_ms: float, batch: int, max_batches: int
) -> dict[str, tuple[float, dict[str, Any]]]:
    """Pending requests sent before ``ceil_ms`` with no lease and no reply, with their score and
    record; records of answered (or expired) requests are dropped on the way."""
    candidates: dict[str, tuple[float, dict[str, Any]]] = {}
    for first in range(0, batch * max_batches, batch):
        entries: list[tuple[bytes, float]] = client.zrangebyscore(  # type: ignore[assignment]
            PENDING_SET, "-inf", ceil_ms, start=first, num=batch, withscores=True
        )
        pipe = client.pipeline(transaction=False)
        for raw_id, _score in entries:
            request_id = raw_id.decode()
            pipe.exists(keys.lease_key(request_id))
            pipe.exists(keys.reply_key(request_id))
            pipe.get(record_key(request_id))
        checks = pipe.execute() if entries else []
        ended = []
        for number, (raw_id, score) in enumerate(entries):
            leased, replied, raw = checks[3 * number : 3 * number + 3]
            record = _read_record(raw)
            if replied or record is None:
                ended.append(raw_id.decode())  # answered (the record came after the reply), expired, unreadable
            elif not leased:
                candidates[raw_id.decode()] = (score, record)
        forget(client, *ended)
        if len(entries) < batch:
            break
    return candidates


def _read_record(raw: Any) -> dict[str, Any] | None:
    """A pending record, or None if it is missing or unreadable."""
    try:
        record = json.loads(raw) if raw else None
    except (ValueError, TypeError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("queue"), str) or task_of(record) is None:
        return None
    return record if isinstance(record.get("kwargs"), dict) else None


def _not_queued(
    client: redis.Redis, candidates: dict[str, tuple[float, dict[str, Any]]], scan_limit: int
) -> dict[str, tuple[float, dict[str, Any]]]:
    """The candidates whose message is neither in ``unacked`` nor on its queue, read in one
    MULTI so a message moving from one to the other is seen in exactly one of them."""
    by_queue: dict[str, list[str]] = defaultdict(list)
    for request_id, (_score, record) in candidates.items():
        by_queue[str(record["queue"])].append(request_id)
    pipe = client.pipeline(transaction=True)
    pipe.hvals(UNACKED)
    for queue in by_queue:
        pipe.lrange(queue, -scan_limit, -1)
        pipe.llen(queue)
    results = pipe.execute()
    present = _ids_in(results[0], unacked=True)
    lost = {}
    for number, (_queue, request_ids) in enumerate(by_queue.items()):
        queued, length = results[1 + 2 * number], results[2 + 2 * number]
        if length > scan_limit:
            continue  # part of the queue unread: nothing can be called lost
        present |= _ids_in(queued, unacked=False)
        lost.update({r: candidates[r] for r in request_ids if r not in present})
    return lost
