"""The first round trip of a run: take the lease, read where the request stands and, for a
request nothing was published for yet, publish its ``start`` event — one Lua script.

What a run must know before it calls a provider: whether another worker holds the request
(then this copy is a duplicate), where its events stopped (a rerun or a hand-off continues their
``seq``), whether a reply is stored (a redelivery of an answered request), whether a producer
cancelled it, and whether the first provider cools down. Asked one by one, that was three round
trips on the way to the first token; here it is one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from tasks.contract import keys
from worker.state.lease import ACQUIRE_LUA, RequestLease

# KEYS 1-3 and ARGV 1-6: the lease (worker.state.lease.ACQUIRE_LUA); then
# KEYS: events stream, reply, cancel key, pub/sub channel, cooldown key (or "")
# ARGV: start event JSON (or ""), events maxlen, events TTL
_OPEN = (
    ACQUIRE_LUA
    + """
local last = redis.call('XREVRANGE', KEYS[4], '+', '-', 'COUNT', 1)
local reply = redis.call('GET', KEYS[5])
local cancelled = redis.call('EXISTS', KEYS[6])
local cooling = -1
if KEYS[8] ~= '' then cooling = redis.call('EXISTS', KEYS[8]) end
local started = 0
if ARGV[7] ~= '' and #last == 0 and not reply then
    redis.call('PUBLISH', KEYS[7], ARGV[7])
    redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[8], '*', 'event', ARGV[7])
    redis.call('EXPIRE', KEYS[4], ARGV[9])
    started = 1
end
return {last, reply, cancelled, cooling, started}
"""
)


@dataclass(frozen=True)
class Opening:
    """Where a request stood when this run took it."""

    last_event: Any
    """The last entry of its events stream (an ``XREVRANGE ... COUNT 1`` reply; empty if none)."""
    stored_reply: bytes | None
    """Its stored ``ChatReply`` JSON, if it was answered already."""
    cancelled: bool
    """A producer set its cancel key."""
    cooling: bool | None
    """Whether the first provider to try cools down; None if that provider has no cooldown."""
    started: bool
    """This script published the ``start`` event (as ``seq`` 0)."""


def open_run(
    client: redis.Redis,
    lease: RequestLease,
    record: tuple[str, dict[str, Any]],
    *,
    cooldown_key: str | None,
    start_event: str | None,
    events_maxlen: int,
    events_ttl_s: int,
) -> Opening | None:
    """Take ``lease`` (recording ``record``: the queue and kwargs to resend the request with)
    and read where the request stands; publish ``start_event`` if the request has no event and
    no reply yet. None if a live worker holds the lease (this copy is a duplicate)."""
    request_id = lease.request_id
    lease_keys, lease_args = lease.acquire_call(*record)
    script_keys = (
        *lease_keys,
        keys.events_stream(request_id),
        keys.reply_key(request_id),
        keys.cancel_key(request_id),
        keys.stream_channel(request_id),
        cooldown_key or "",
    )
    script_args = (*lease_args, start_event or "", events_maxlen, events_ttl_s)
    result = client.eval(_OPEN, len(script_keys), *script_keys, *script_args)
    if result is None:
        return None
    lease.taken()
    last, reply, cancelled, cooling, started = result
    return Opening(
        # As redis-py's XREVRANGE gives it: the script's reply has each entry's fields flat.
        last_event=[(entry_id, dict(zip(fields[::2], fields[1::2], strict=True))) for entry_id, fields in last],
        stored_reply=reply,
        cancelled=bool(cancelled),
        cooling=None if cooling == -1 else bool(cooling),
        started=bool(started),
    )
