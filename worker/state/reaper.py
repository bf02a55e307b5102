"""The reaper: every worker's main process looks for requests whose lease expired (their
worker died) and sends their task message again, so another worker picks them up within
seconds. See ``worker.state.lease``. Each such resend is a death of the request: one that keeps
killing its worker process is ended instead, and a resumed run keeps the first run's deadline
(``worker.state.deaths``).

It also puts back orphans: a message a worker took from the queue but never started (the worker
died in the few milliseconds before the task took its lease) has no lease and no in-flight
record, only kombu's unacked entry, which the broker would restore only after its visibility
timeout (longer than the longest request). An unacked Cascade task message that has waited
``orphan_after_s`` and whose request never started — no lease, no in-flight record, no reply,
no event since the message was sent — goes back to its queue. A copy delivered twice runs once:
the lease and the stored reply drop the other.

Last, it resends requests whose message was lost before kombu recorded it anywhere
(``worker.state.pending``). Every resend is of the task the record names (``cascade.chat`` or
``cascade.image``; ``cascade.chat`` for a record that names none).
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from typing import Any

import redis

from tasks.contract import keys
from tasks.contract.schemas import StreamEvent, usable_request_id
from tasks.producer.pending import note_sent
from worker.state import lua
from worker.state.deaths import DEATHS_TTL_S, RunEnds, keep_window, read_record
from worker.state.pending import UNACKED, GiveUp, Resend, lead_sweep, request_id_in, resend_lost, task_kwargs, task_of

logger = logging.getLogger(__name__)

UNACKED_INDEX = keys.UNACKED_INDEX


def reclaim_expired(client: redis.Redis, resend: Resend, *, ends: RunEnds | None = None, batch: int = 100) -> list[str]:
    """Resend the message of every request whose lease expired; return their ids.

    Each one is a death of its request (``worker.state.deaths``): with ``ends``, a request that died
    ``ends.max_deaths`` times, or whose first run's deadline passed, is ended instead of resent.
    """
    now_ms = int(time.time() * 1000)
    reclaimed = []
    expired: list[bytes] = client.zrangebyscore(keys.INFLIGHT_SET, "-inf", now_ms, start=0, num=batch)  # type: ignore[assignment]
    for raw_id in expired:
        request_id = raw_id.decode()
        claimed = lua.CLAIM_EXPIRED.call(
            client,
            keys={
                "inflight_set": keys.INFLIGHT_SET,
                "lease_key": keys.lease_key(request_id),
                "inflight_record": keys.inflight_record(request_id),
                "deaths_key": keys.deaths_key(request_id),
            },
            args={"request_id": request_id, "now_ms": now_ms, "deaths_ttl_s": DEATHS_TTL_S},
        )
        if not claimed:
            continue
        if client.exists(keys.reply_key(request_id)):
            continue  # it finished after all (the reply landed just before the worker died)
        raw_record, deaths = claimed
        record = read_record(raw_record)
        task = task_of(record) if record is not None else None
        if record is None or task is None:
            logger.error("request %s lost its worker and left no readable record to resend", request_id)
            continue
        window = keep_window(client, request_id, record)
        if ends is not None and int(deaths) >= ends.max_deaths:
            ends.worker_lost(request_id, record, int(deaths))
            continue
        if ends is not None and window is not None and window[1] <= time.time():
            ends.deadline_passed(request_id, record)
            continue
        logger.warning(
            "request %s lost its worker (%d time(s)); sending it to %s again", request_id, int(deaths), record["queue"]
        )
        resend(record["queue"], record["kwargs"], task)
        note_sent(client, request_id, record["queue"], record["kwargs"], task=task)  # what is in flight now
        reclaimed.append(request_id)
    return reclaimed


def restore_orphans(client: redis.Redis, *, orphan_after_s: float, page: int = 200, max_pages: int = 50) -> list[str]:
    """Put back on its queue every Cascade task message a worker took and never started
    (see the module docstring); return the request ids. Two round trips per page of unacked
    messages older than ``orphan_after_s`` (most are long requests still running)."""
    ceil = time.time() - orphan_after_s
    restored = []
    for first in range(0, page * max_pages, page):
        tags: list[bytes] = client.zrangebyscore(UNACKED_INDEX, "-inf", ceil, start=first, num=page)  # type: ignore[assignment]
        if not tags:
            break
        parsed = [(tag, _parse(raw)) for tag, raw in zip(tags, client.hmget(UNACKED, tags), strict=True)]
        candidates = [(tag, found) for tag, found in parsed if found is not None]
        pipe = client.pipeline(transaction=False)
        for _tag, (request_id, _queue, _message, _handoff) in candidates:
            pipe.exists(*_guards(request_id))
            pipe.xrevrange(keys.events_stream(request_id), count=1)
        checks = pipe.execute() if candidates else []
        for number, (tag, (request_id, queue, message, handoff)) in enumerate(candidates):
            running, last = checks[2 * number], checks[2 * number + 1]
            if running or (last and not _unstarted_since_handoff(last, handoff)):
                continue  # it started: the lease and the in-flight record cover it from there
            lease, reply, inflight = _guards(request_id)
            restored_now = lua.RESTORE_ORPHAN.call(
                client,
                keys={
                    "unacked_index": UNACKED_INDEX,
                    "unacked": UNACKED,
                    "lease_key": lease,
                    "reply_key": reply,
                    "inflight_record": inflight,
                    "queue": queue,
                },
                args={"tag": tag, "ceil": ceil, "message": message},
            )
            if restored_now:
                logger.warning("request %s: its worker died before starting it; back to %s", request_id, queue)
                restored.append(request_id)
        if len(tags) < page:
            break
    return restored


def _guards(request_id: str) -> tuple[str, str, str]:
    """Keys that exist once a request started (or ended): lease, reply, in-flight record."""
    return keys.lease_key(request_id), keys.reply_key(request_id), keys.inflight_record(request_id)


def _unstarted_since_handoff(last: Any, handoff: dict[str, Any] | None) -> bool:
    """True if a hand-off message's request published nothing since it was handed off."""
    if handoff is None:
        return False
    try:
        seq = StreamEvent.model_validate_json(last[0][1][keys.EVENT_FIELD.encode()]).seq
        return seq + 1 <= int(handoff.get("next_seq", 0))
    except (ValueError, TypeError, KeyError, IndexError):
        return False  # unreadable: leave it to the visibility timeout


def _parse(raw: Any) -> tuple[str, str, str, dict[str, Any] | None] | None:
    """(request id, queue, message to push back, hand-off state) of an unacked message if it is
    a Cascade task message a task can run; else None (the visibility timeout deals with it)."""
    if not isinstance(raw, bytes):
        return None
    try:
        message, _exchange, queue = json.loads(raw)
        headers = message.get("headers") or {}
        kwargs = task_kwargs(message)
        if kwargs is None or headers.get("eta"):
            return None
        candidates = (request_id_in(kwargs), headers.get("id"))
        request_id = next(filter(None, (usable_request_id(c) if isinstance(c, str) else None for c in candidates)))
        handoff = kwargs.get("handoff")
    except (ValueError, TypeError, KeyError, AttributeError, StopIteration, RecursionError):
        return None
    for entry in (headers, message.get("properties", {}).get("delivery_info")):
        if isinstance(entry, dict):
            entry["redelivered"] = True
    message["headers"] = headers
    return request_id, str(queue), json.dumps(message), handoff if isinstance(handoff, dict) else None


class Reaper:
    """A daemon thread running ``reclaim_expired``, ``restore_orphans`` and
    ``worker.state.pending.resend_lost`` every ``interval_s``. Orphans and lost messages are those
    unstarted for ``orphan_after_s`` (by default 20 intervals, at least 10 s: far longer than a
    live worker takes to start a message)."""

    def __init__(
        self,
        client: redis.Redis,
        resend: Resend,
        interval_s: float,
        orphan_after_s: float | None = None,
        give_up: GiveUp | None = None,
        ends: RunEnds | None = None,
    ) -> None:
        self._client = client
        self._resend = resend
        self._give_up = give_up
        self._ends = ends
        self._interval_s = interval_s
        self._orphan_after_s = orphan_after_s if orphan_after_s is not None else max(10.0, 20 * interval_s)
        self._suspects: dict[str, float] = {}
        self._token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cascade-reaper", daemon=True)

    def start(self) -> None:
        """Start reaping."""
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current pass."""
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                reclaim_expired(self._client, self._resend, ends=self._ends)
                restore_orphans(self._client, orphan_after_s=self._orphan_after_s)
                if lead_sweep(self._client, self._token, hold_s=3 * self._interval_s):
                    resend_lost(
                        self._client,
                        self._resend,
                        older_than_s=self._orphan_after_s,
                        suspects=self._suspects,
                        give_up=self._give_up,
                    )
                else:
                    self._suspects.clear()  # another reaper sweeps; its suspects are its own
            except redis.RedisError as exc:  # Redis restarting: try again next pass
                logger.info("reaper pass skipped: %s", type(exc).__name__)
            except Exception:
                logger.exception("reaper pass failed")
