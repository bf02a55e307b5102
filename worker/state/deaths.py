"""Poison requests: a request whose run keeps killing its worker process ends, instead of being
resumed forever.

A run that dies with its process (an OOM kill, a segfault, ``os._exit``, a huge ``num_beams``)
leaves its lease to lapse and its in-flight record to a reaper (``worker.state.reaper``), which sends
the request again. Each such claim is a death of the request, counted in
``cascade:deaths:{request_id}`` (a hash with a TTL). The hash also keeps the first run's start
and deadline, read from its in-flight record (``worker.state.lease``): a resumed run keeps them
(``carried_window``), so resumes never renew the deadline.

After ``Settings.max_worker_deaths`` deaths (3) the reaper ends the request instead of resending
it (``RunEnds``): a ``failed`` reply with error type ``worker_lost``, its terminal ``error`` event
and a dead letter, written by the publisher's one-reply script, so a later copy of the message
finds the reply and never runs. A request whose deadline passed while it was being resumed ends
``deadline_exceeded`` the same way, without a dead letter (it may not be poison at all).

A death is counted when a reaper claims the dead run's record. A redelivered copy that takes the
lapsed lease before any reaper looked (the broker requeues a message whose pool process died)
runs without that death being counted; its own death, if it dies, is.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from tasks.contract import keys
from tasks.contract.images import IMAGE_TASK_NAME, ImageReply
from tasks.contract.schemas import AttemptRecord, ChainMeta, ChatReply, ErrorInfo
from worker.state.publisher import EventPublisher
from worker.state.recovery import WORKER_LOST, read_lost_run
from worker.state.store import DeadLetters, ReplyStore

if TYPE_CHECKING:
    from worker.runtime import WorkerRuntime

logger = logging.getLogger(__name__)

DEATHS_KEY = keys.DEATHS
# Longer than any request may run (its deadline is capped by Settings.max_timeout_s).
DEATHS_TTL_S = 86_400
_COUNT, _STARTED, _DEADLINE = "deaths", "started_at", "deadline_at"


def deaths_key(request_id: str) -> str:
    """The hash holding ``request_id``'s death count and its first run's start and deadline."""
    return keys.deaths_key(request_id)


def read_record(raw: Any) -> dict[str, Any] | None:
    """An in-flight record (``{"queue", "kwargs", "task"?, "started_at"?, "deadline_at"?}``), or None if
    it is unreadable."""
    try:
        record = json.loads(raw) if raw else None
    except (ValueError, TypeError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("queue"), str):
        return None
    return record if isinstance(record.get("kwargs"), dict) else None


def keep_window(client: redis.Redis, request_id: str, record: dict[str, Any]) -> tuple[float, float] | None:
    """Keep the run window of ``record`` unless an earlier run's is kept already; return the
    kept one (None if no run recorded one). One round trip."""
    pipe = client.pipeline(transaction=True)
    started, deadline = _window_of(record.get(_STARTED), record.get(_DEADLINE))
    if started is not None and deadline is not None:
        key = deaths_key(request_id)
        pipe.hsetnx(key, _STARTED, repr(started))
        pipe.hsetnx(key, _DEADLINE, repr(deadline))
        pipe.expire(key, DEATHS_TTL_S)
    pipe.hmget(deaths_key(request_id), [_STARTED, _DEADLINE])
    kept = pipe.execute()[-1]
    window = _window_of(*kept)
    return None if window[0] is None or window[1] is None else (window[0], window[1])


def carried_window(client: redis.Redis, request_id: str) -> tuple[float, float] | None:
    """The first run's (start, deadline) as unix times, if a run of ``request_id`` died and a
    reaper kept them; a resumed run keeps them instead of its own."""
    started, deadline = _window_of(*client.hmget(deaths_key(request_id), [_STARTED, _DEADLINE]))
    return None if started is None or deadline is None else (started, deadline)


def _window_of(started: Any, deadline: Any) -> tuple[float | None, float | None]:
    return _moment(started), _moment(deadline)


def _moment(value: Any) -> float | None:
    try:
        moment = float(value.decode() if isinstance(value, bytes) else value)
    except (TypeError, ValueError, AttributeError):
        return None
    return moment if math.isfinite(moment) else None


@dataclass
class RunEnds:
    """What a reaper needs to end a request it will not resend (see the module docstring)."""

    client: redis.Redis
    replies: ReplyStore
    dead_letters: DeadLetters
    events_maxlen: int
    events_ttl_s: int
    chains: dict[str, list[str]]
    worker: str
    max_deaths: int = 3

    @classmethod
    def of(cls, runtime: WorkerRuntime) -> RunEnds:
        """The ends of ``runtime``'s worker, with its settings."""
        settings = runtime.settings
        return cls(
            client=runtime.redis,
            replies=runtime.replies,
            dead_letters=runtime.dead_letters,
            events_maxlen=settings.events_maxlen,
            events_ttl_s=settings.events_ttl_s,
            chains=settings.chains,
            worker=runtime.worker_name,
            max_deaths=settings.max_worker_deaths,
        )

    def worker_lost(self, request_id: str, record: dict[str, Any], deaths: int) -> bool:
        """End ``request_id`` ``failed`` (``worker_lost``) with a dead letter; False if it was
        answered meanwhile or a live run holds it (then nothing is written)."""
        message = f"the request's run ended its worker process {deaths} times; it is not run again"
        logger.error("request %s: %s", request_id, message)
        error = ErrorInfo(type=WORKER_LOST, message=message)
        if not self._end(request_id, record, error):
            return False
        self.dead_letters.push(
            WORKER_LOST, message, body=record["kwargs"], request_id=request_id, queue=record["queue"]
        )
        return True

    def deadline_passed(self, request_id: str, record: dict[str, Any]) -> bool:
        """End ``request_id`` ``failed`` (``deadline_exceeded``): its deadline passed while it
        was being resumed."""
        logger.warning("request %s: its deadline passed while it was resumed; ending it", request_id)
        error = ErrorInfo(type="deadline_exceeded", message="the request's deadline passed")
        return self._end(request_id, record, error)

    def _end(self, request_id: str, record: dict[str, Any], error: ErrorInfo) -> bool:
        request = record["kwargs"].get("request")
        request = request if isinstance(request, dict) else {}
        images = record.get("task") == IMAGE_TASK_NAME
        chain = request.get("chain", "images" if images else "default")
        chain = chain if isinstance(chain, str) and chain in self.chains else None
        attempts = self._attempts(request_id, self.chains[chain] if chain else [])
        metadata = request.get("metadata")
        # The reply of the request's own task: an image request's is an ImageReply.
        reply = (ImageReply if images else ChatReply)(
            request_id=request_id,
            status="failed",
            error=error,
            meta=ChainMeta(chain=chain, attempts=attempts, total_attempts=len(attempts), worker=self.worker),
            metadata=metadata if isinstance(metadata, dict) else {},
        )
        publisher = EventPublisher(
            self.client,
            request_id,
            store=self.replies,
            events_maxlen=self.events_maxlen,
            events_ttl_s=self.events_ttl_s,
            next_seq=EventPublisher.resume_seq(self.client, request_id),
        )
        return publisher.finish("error", reply, error=error)

    def _attempts(self, request_id: str, chain: list[str]) -> list[AttemptRecord]:
        """The attempts the request's runs left in its stream, the dead one's as ``worker_lost``."""
        try:
            return read_lost_run(self.client, request_id, 0, chain).attempts
        except (ValueError, KeyError, IndexError):  # an unreadable event: the reply says less
            return []
