"""Request leases: who is running a request right now, kept alive by the process's timer.

A worker that starts a request takes its lease (``cascade:lease:{id}``, a random token with a
short TTL) and records the task message it is running (``cascade:inflight:{id}``) with the
lease's expiry in the sorted set ``cascade:inflight`` (``worker.state.session`` opens the run
with both). The process's timer thread (``providers.timer``) renews both every third of the TTL
while the request runs. If the worker dies — SIGKILL, OOM, a lost machine — the renewals stop,
the lease expires within seconds, and any surviving worker's reaper (``worker.state.reaper``)
sends the recorded message again. The record also holds the run's start and deadline, which a
resumed run keeps (``worker.state.deaths``). Recovery therefore never waits for the broker's
visibility timeout, which must stay longer than the longest request (celery/celery#5935).

A second delivery of a request whose lease is held by a live worker is a duplicate and is
dropped; a worker whose lease was taken over stops at its next event (``LeaseLost``).
"""

from __future__ import annotations

import logging
import secrets
import time

import redis

from providers.timer import TIMER, Timer
from tasks.contract import keys
from worker.state import lua

logger = logging.getLogger(__name__)


class LeaseLost(Exception):
    """Another worker took the request over: this run must stop without a reply.

    Not a provider error, nor a ``providers.errors.RequestStopped``: the chain never falls back
    on it nor ends the request with it (it records the attempt as stopped and lets it through),
    and the runner lets it reach the task, which drops the run without writing anything."""

    code = "lease_lost"


class RequestLease:
    """The lease of one request on this worker: its token and its renewals. The run's session
    (``worker.state.session``) takes and lets go of it."""

    def __init__(
        self, client: redis.Redis, request_id: str, *, ttl_s: float, worker: str = "", timer: Timer = TIMER
    ) -> None:
        self._client = client
        self._timer = timer
        self.request_id = request_id
        self.key = keys.lease_key(request_id)
        self.ttl_ms = int(ttl_s * 1000)
        self.token = f"{worker}:{secrets.token_hex(8)}"
        self.lost = False

    @property
    def interval_s(self) -> float:
        """Time between two renewals: a third of the TTL."""
        return self.ttl_ms / 3000

    def expires_at_ms(self) -> int:
        """When the lease expires if taken or renewed now (unix ms), the in-flight set's score."""
        return int(time.time() * 1000) + self.ttl_ms

    def start_renewing(self) -> None:
        """Renew the lease every third of its TTL from now on (it was just taken)."""
        self._timer.schedule(self, self._timer.clock() + self.interval_s, self._beat)

    def stop_renewing(self) -> None:
        """Stop the renewals; once this returns none is in flight."""
        self._timer.cancel(self)

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
            self.start_renewing()

    def renew(self) -> bool:
        """Extend the lease; False once it was taken over."""
        try:
            renewed = lua.RENEW.call(
                self._client,
                keys={"lease_key": self.key, "inflight_set": keys.INFLIGHT_SET},
                args={
                    "token": self.token,
                    "lease_ttl_ms": self.ttl_ms,
                    "expires_at_ms": self.expires_at_ms(),
                    "request_id": self.request_id,
                },
            )
        except redis.RedisError:
            return True  # Redis is restarting; the next beat tries again
        if not renewed:
            logger.warning("lease of %s was taken over; this run will stop", self.request_id)
            self.lost = True
            return False
        return True
