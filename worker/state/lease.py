"""Request leases: who is running a request right now, kept alive by a heartbeat.

A worker that starts a request takes its lease (``cascade:lease:{id}``, a random token with a
short TTL) and records the task message it is running (``cascade:inflight:{id}``) with the
lease's expiry in the sorted set ``cascade:inflight``. The process's timer thread
(``providers.timer``) renews both every third of the TTL while the request runs. If the worker
dies — SIGKILL, OOM, a lost machine — the heartbeat stops, the lease expires within seconds,
and any surviving worker's reaper (``worker.state.reaper``) sends the recorded message again. The
record also holds the run's start and deadline, which a resumed run keeps (``worker.state.deaths``).
Recovery therefore never waits for the broker's visibility timeout, which must stay longer
than the longest request (celery/celery#5935).

A second delivery of a request whose lease is held by a live worker is a duplicate and is
dropped; a worker whose lease was taken over stops at its next event (``LeaseLost``).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from typing import Any

import redis

from providers.errors import RequestStopped
from providers.timer import TIMER, Timer

logger = logging.getLogger(__name__)

LEASE_KEY = "cascade:lease:{request_id}"
INFLIGHT_KEY = "cascade:inflight:{request_id}"
INFLIGHT_SET = "cascade:inflight"

# Take the lease if it is free and record the message to resend, in one round trip. The body
# (KEYS 1-3, ARGV 1-6) also opens ``worker.state.opening``'s script, which goes on from there.
# A lease already holding this run's token is taken too: a retried call (the reply to the first
# was lost with the connection) must not find its own lease and drop the request as a duplicate.
ACQUIRE_LUA = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return false end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[6])
"""
_ACQUIRE = ACQUIRE_LUA + "return 1\n"
# Renew only if the lease is still ours (compare-and-expire).
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    redis.call('ZADD', KEYS[2], 'XX', ARGV[3], ARGV[4])
    return 1
end
return 0
"""
# Release only if the lease is still ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('DEL', KEYS[1], KEYS[3])
    redis.call('ZREM', KEYS[2], ARGV[2])
    return 1
end
return 0
"""


class LeaseLost(RequestStopped):
    """Another worker took the request over: this run must stop without a reply."""

    code = "lease_lost"


def lease_key(request_id: str) -> str:
    """The key holding the token of the worker running ``request_id``."""
    return LEASE_KEY.format(request_id=request_id)


class RequestLease:
    """The lease of one request on this worker; use ``acquire`` then ``release``."""

    def __init__(
        self,
        client: redis.Redis,
        request_id: str,
        *,
        ttl_s: float,
        record_ttl_s: int,
        worker: str = "",
        timer: Timer = TIMER,
    ) -> None:
        self._client = client
        self._timer = timer
        self.request_id = request_id
        self.key = lease_key(request_id)
        self._inflight = INFLIGHT_KEY.format(request_id=request_id)
        self._ttl_ms = int(ttl_s * 1000)
        self._record_ttl_s = record_ttl_s
        self.token = f"{worker}:{secrets.token_hex(8)}"
        self.lost = False
        self.abandoned = False
        self.released = False
        self.held = False
        self.window: tuple[float, float] | None = None
        """The run's start and deadline (unix times), recorded with the message so that a
        resumed run keeps them (``worker.state.deaths``)."""

    def acquire(self, queue: str, kwargs: dict[str, Any]) -> bool:
        """Take the lease and record the message to resend if this worker dies; False if a
        live worker already holds it."""
        keys, args = self.acquire_call(queue, kwargs)
        if not self._client.eval(_ACQUIRE, len(keys), *keys, *args):
            return False
        self.taken()
        return True

    def acquire_call(self, queue: str, kwargs: dict[str, Any]) -> tuple[tuple[str, ...], tuple[Any, ...]]:
        """KEYS and ARGV of ``ACQUIRE_LUA`` for this lease and the message to record."""
        entry: dict[str, Any] = {"queue": queue, "kwargs": kwargs}
        if self.window is not None:
            entry["started_at"], entry["deadline_at"] = self.window
        record = json.dumps(entry)
        keys = (self.key, self._inflight, INFLIGHT_SET)
        return keys, (self.token, self._ttl_ms, record, self._record_ttl_s, self._expiry_ms(), self.request_id)

    def taken(self) -> None:
        """Start renewing the lease: a script running ``ACQUIRE_LUA`` took it."""
        self.held = True
        self._schedule_beat()

    def release_keys(self) -> tuple[str, str, str]:
        """The keys a script releasing this lease deletes or edits: lease, in-flight record and
        the in-flight set (``worker.state.publisher`` releases it with the reply)."""
        return self.key, self._inflight, INFLIGHT_SET

    def stop_renewing(self) -> None:
        """Stop the heartbeat (before a script that may release the lease runs)."""
        self._timer.cancel(self)

    def holds(self, current: bytes | None) -> bool:
        """True if ``current`` (the lease key's value read elsewhere) is this lease's token."""
        return current is not None and current.decode() == self.token

    def release(self) -> None:
        """Stop the heartbeat and drop the lease and the in-flight record (unless abandoned, never
        taken, or released already, by this call or with the reply)."""
        self._timer.cancel(self)
        if self.abandoned or self.released or not self.held:
            return
        self.released = True
        try:
            self._client.eval(_RELEASE, 3, self.key, INFLIGHT_SET, self._inflight, self.token, self.request_id)
        except redis.RedisError:
            logger.warning("could not release the lease of %s; it expires by itself", self.request_id)

    def abandon(self) -> None:
        """Stop renewing the lease but keep it and the in-flight record, for a run cut off from
        Redis before its request ended: the lease lapses within its TTL and a reaper sends the
        request again. A later ``release`` does nothing."""
        self._timer.cancel(self)
        self.abandoned = True

    def _expiry_ms(self) -> int:
        return int(time.time() * 1000) + self._ttl_ms

    @property
    def interval_s(self) -> float:
        """Time between two renewals: a third of the TTL."""
        return self._ttl_ms / 3000

    def renew(self) -> bool:
        """Extend the lease (the heartbeat calls this); False once it was taken over."""
        try:
            renewed = self._client.eval(
                _RENEW, 2, self.key, INFLIGHT_SET, self.token, self._ttl_ms, self._expiry_ms(), self.request_id
            )
        except redis.RedisError:
            return True  # Redis is restarting; the next beat tries again
        if not renewed:
            logger.warning("lease of %s was taken over; this run will stop", self.request_id)
            self.lost = True
            return False
        return True

    def _schedule_beat(self) -> None:
        self._timer.schedule(self, self._timer.clock() + self.interval_s, self._beat)

    def _beat(self) -> None:
        """The timer's part: renew, and renew again a third of the TTL later while the lease is
        ours. The round trip runs on the timer's thread, never under a lock a request thread
        taking or giving up a lease waits for."""
        try:
            renewed = self.renew()
        except Exception:  # a bug: stop renewing this lease, the timer goes on with the others
            logger.exception("renewing the lease of %s failed", self.request_id)
            return
        if renewed:
            self._schedule_beat()
