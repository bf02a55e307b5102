"""Request leases: who is running a request right now, kept alive by a heartbeat.

A worker that starts a request takes its lease (``cascade:lease:{id}``, a random token with a
short TTL) and records the task message it is running (``cascade:inflight:{id}``) with the
lease's expiry in the sorted set ``cascade:inflight``. A heartbeat thread renews both every
third of the TTL while the request runs. If the worker dies — SIGKILL, OOM, a lost machine —
the heartbeat stops, the lease expires within seconds, and any surviving worker's reaper
(``worker.reaper``) sends the recorded message again. Recovery therefore never waits for the
broker's visibility timeout, which must stay longer than the longest request
(celery/celery#5935).

A second delivery of a request whose lease is held by a live worker is a duplicate and is
dropped; a worker whose lease was taken over stops at its next event (``LeaseLost``).
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from typing import Any

import redis

from providers.errors import RequestStopped

logger = logging.getLogger(__name__)

LEASE_KEY = "cascade:lease:{request_id}"
INFLIGHT_KEY = "cascade:inflight:{request_id}"
INFLIGHT_SET = "cascade:inflight"

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
        self, client: redis.Redis, request_id: str, *, ttl_s: float, record_ttl_s: int, worker: str = ""
    ) -> None:
        self._client = client
        self.request_id = request_id
        self.key = lease_key(request_id)
        self._inflight = INFLIGHT_KEY.format(request_id=request_id)
        self._ttl_ms = int(ttl_s * 1000)
        self._record_ttl_s = record_ttl_s
        self.token = f"{worker}:{secrets.token_hex(8)}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def acquire(self, queue: str, kwargs: dict[str, Any]) -> bool:
        """Take the lease and record the message to resend if this worker dies; False if a
        live worker already holds it."""
        if not self._client.set(self.key, self.token, nx=True, px=self._ttl_ms):
            return False
        pipe = self._client.pipeline(transaction=True)
        pipe.set(self._inflight, json.dumps({"queue": queue, "kwargs": kwargs}), ex=self._record_ttl_s)
        pipe.zadd(INFLIGHT_SET, {self.request_id: self._expiry_ms()})
        pipe.execute()
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease-{self.request_id}", daemon=True)
        self._thread.start()
        return True

    def holds(self, current: bytes | None) -> bool:
        """True if ``current`` (the lease key's value read elsewhere) is this lease's token."""
        return current is not None and current.decode() == self.token

    def release(self) -> None:
        """Stop the heartbeat and drop the lease and the in-flight record."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self._client.eval(_RELEASE, 3, self.key, INFLIGHT_SET, self._inflight, self.token, self.request_id)
        except redis.RedisError:
            logger.warning("could not release the lease of %s; it expires by itself", self.request_id)

    def _expiry_ms(self) -> int:
        return int(time.time() * 1000) + self._ttl_ms

    def _heartbeat(self) -> None:
        interval = self._ttl_ms / 3000
        while not self._stop.wait(interval):
            try:
                renewed = self._client.eval(
                    _RENEW, 2, self.key, INFLIGHT_SET, self.token, self._ttl_ms, self._expiry_ms(), self.request_id
                )
            except redis.RedisError:
                continue  # Redis is restarting; the next beat tries again
            if not renewed:
                logger.warning("lease of %s was taken over; this run will stop", self.request_id)
                self.lost = True
                return
