"""The reaper: every worker's main process looks for requests whose lease expired (their
worker died) and sends their task message again, so another worker picks them up within
seconds. See ``worker.lease``."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from tasks import keys
from worker.lease import INFLIGHT_KEY, INFLIGHT_SET, lease_key

logger = logging.getLogger(__name__)

# Claim one expired request: exactly one reaper wins the ZREM; a live lease means no claim.
_CLAIM = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return false end
if redis.call('EXISTS', KEYS[2]) == 1 then return false end
redis.call('ZREM', KEYS[1], ARGV[1])
local record = redis.call('GET', KEYS[3])
redis.call('DEL', KEYS[3])
return record
"""

Resend = Callable[[str, dict[str, Any]], None]


def reclaim_expired(client: redis.Redis, resend: Resend, *, batch: int = 100) -> list[str]:
    """Resend the message of every request whose lease expired; return their ids."""
    now_ms = int(time.time() * 1000)
    reclaimed = []
    expired: list[bytes] = client.zrangebyscore(INFLIGHT_SET, "-inf", now_ms, start=0, num=batch)  # type: ignore[assignment]
    for raw_id in expired:
        request_id = raw_id.decode()
        inflight = INFLIGHT_KEY.format(request_id=request_id)
        record = client.eval(_CLAIM, 3, INFLIGHT_SET, lease_key(request_id), inflight, request_id, now_ms)
        if not record:
            continue
        if client.exists(keys.reply_key(request_id)):
            continue  # it finished after all (the reply landed just before the worker died)
        message = json.loads(record)
        logger.warning("request %s lost its worker; sending it to %s again", request_id, message["queue"])
        resend(message["queue"], message["kwargs"])
        reclaimed.append(request_id)
    return reclaimed


class Reaper:
    """A daemon thread running ``reclaim_expired`` every ``interval_s``."""

    def __init__(self, client: redis.Redis, resend: Resend, interval_s: float) -> None:
        self._client = client
        self._resend = resend
        self._interval_s = interval_s
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
                reclaim_expired(self._client, self._resend)
            except redis.RedisError as exc:  # Redis restarting: try again next pass
                logger.info("reaper pass skipped: %s", type(exc).__name__)
            except Exception:
                logger.exception("reaper pass failed")
