"""Every Lua script Cascade runs on Redis, each named, with its KEYS and ARGV named too.

A ``Script`` lists the names of its keys and arguments; its source opens with one Lua local per
name (``local lease_key = KEYS[1]`` ...), so the body reads by name, and ``Script.call`` takes
them as keyword mappings and checks that every one is given, so no caller counts offsets. A
script whose ARGV ends in a list of any length (the events ``EMIT`` publishes) names that
tail ``rest``; its first index is the local ``<rest>_from``.

``call`` sends ``EVALSHA`` and falls back to ``EVAL`` once when Redis does not know the script
yet (after a restart, or on a new server): the script's text crosses the network once per
server, not with every event.

Each script is atomic: what it checks and what it writes are one step, which is why the lease
check and the writes of a run (``worker.state.session``, ``worker.state.publisher``) and the
reaper's claims (``worker.state.reaper``, ``worker.state.pending``) are scripts at all.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis


@dataclass(frozen=True)
class Script:
    """One Lua script with named KEYS and ARGV (see the module docstring)."""

    name: str
    keys: tuple[str, ...]
    args: tuple[str, ...]
    body: str
    rest: str | None = None
    """The name of a trailing list of arguments of any length, if the script takes one."""
    source: str = field(init=False, repr=False)
    sha: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        names = [*self.keys, *self.args, *([f"{self.rest}_from"] if self.rest else [])]
        if len(set(names)) != len(names) or not all(name.isidentifier() for name in names):
            raise ValueError(f"script {self.name}: names must be distinct identifiers: {names}")
        lines = [f"local {name} = KEYS[{number}]" for number, name in enumerate(self.keys, 1)]
        lines += [f"local {name} = ARGV[{number}]" for number, name in enumerate(self.args, 1)]
        if self.rest:
            lines.append(f"local {self.rest}_from = {len(self.args) + 1}")
        source = "\n".join(lines) + "\n" + self.body.strip() + "\n"
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "sha", hashlib.sha1(source.encode()).hexdigest())  # noqa: S324 - Redis names scripts by SHA-1

    def call(
        self, client: redis.Redis, keys: Mapping[str, str], args: Mapping[str, Any], rest: Sequence[Any] = ()
    ) -> Any:
        """Run the script with ``keys`` and ``args`` by name (every name, no other) and the
        trailing ``rest``; return its reply."""
        if set(keys) != set(self.keys) or set(args) != set(self.args):
            raise TypeError(
                f"script {self.name} takes keys {self.keys} and args {self.args}; got {tuple(keys)} and {tuple(args)}"
            )
        if rest and not self.rest:
            raise TypeError(f"script {self.name} takes no trailing arguments")
        key_values = [keys[name] for name in self.keys]
        arg_values = [*(args[name] for name in self.args), *rest]
        try:
            return client.evalsha(self.sha, len(key_values), *key_values, *arg_values)
        except redis.exceptions.NoScriptError:
            return client.eval(self.source, len(key_values), *key_values, *arg_values)


# --- a run: open, write, end (worker.state.session, worker.state.publisher, worker.state.lease) ---

OPEN = Script(
    "open",
    keys=(
        "lease_key",
        "inflight_record",
        "inflight_set",
        "events_stream",
        "reply_key",
        "cancel_key",
        "channel",
        "cooldown_key",
    ),
    args=(
        "token",
        "lease_ttl_ms",
        "record",
        "record_ttl_s",
        "expires_at_ms",
        "request_id",
        "start_event",
        "events_maxlen",
        "events_ttl_s",
    ),
    body="""
-- Take the lease unless another worker holds it. One holding this run's token already is taken
-- too: a retried call (its first reply lost with the connection) must not drop its own request
-- as a duplicate.
local holder = redis.call('GET', lease_key)
if holder and holder ~= token then return false end
redis.call('SET', lease_key, token, 'PX', lease_ttl_ms)
redis.call('SET', inflight_record, record, 'EX', record_ttl_s)
redis.call('ZADD', inflight_set, expires_at_ms, request_id)
-- Where the request stands; cooldown_key '' means the first provider has no cooldown.
local last = redis.call('XREVRANGE', events_stream, '+', '-', 'COUNT', 1)
local reply = redis.call('GET', reply_key)
local cancelled = redis.call('EXISTS', cancel_key)
local cooling = -1
if cooldown_key ~= '' then cooling = redis.call('EXISTS', cooldown_key) end
-- A request nothing was published for gets its start event (start_event '' for a hand-off).
local started = 0
if start_event ~= '' and #last == 0 and not reply then
    redis.call('PUBLISH', channel, start_event)
    redis.call('XADD', events_stream, 'MAXLEN', '~', events_maxlen, '*', 'event', start_event)
    redis.call('EXPIRE', events_stream, events_ttl_s)
    started = 1
end
return {last, reply, cancelled, cooling, started}
""",
)

RENEW = Script(
    "renew",
    keys=("lease_key", "inflight_set"),
    args=("token", "lease_ttl_ms", "expires_at_ms", "request_id"),
    body="""
-- Compare-and-expire: renew only a lease that is still ours.
if redis.call('GET', lease_key) == token then
    redis.call('PEXPIRE', lease_key, lease_ttl_ms)
    redis.call('ZADD', inflight_set, 'XX', expires_at_ms, request_id)
    return 1
end
return 0
""",
)

RELEASE = Script(
    "release",
    keys=("lease_key", "inflight_record", "inflight_set"),
    args=("token", "request_id"),
    body="""
if redis.call('GET', lease_key) == token then
    redis.call('DEL', lease_key, inflight_record)
    redis.call('ZREM', inflight_set, request_id)
    return 1
end
return 0
""",
)

STORE_IMAGE = Script(
    "store_image",
    keys=("lease_key", "image_key"),
    args=("token", "data", "ttl_s"),
    body="""
-- A generated image's bytes (cascade.image), written only while the lease holds this run's
-- token: a run taken over by another worker must not overwrite the images of the one that
-- answers.
if redis.call('GET', lease_key) ~= token then return -1 end
redis.call('SET', image_key, data, 'EX', ttl_s)
return 1
""",
)

EMIT = Script(
    "emit",
    keys=("channel", "events_stream", "cancel_key", "lease_key"),
    args=("events_maxlen", "events_ttl_s", "token"),
    rest="events",
    body="""
-- A leased writer writes only while the lease holds its token (-1 otherwise); a writer with no
-- lease (token '') only while nobody holds it (-2 otherwise).
local holder = redis.call('GET', lease_key)
if token == '' then
    if holder then return -2 end
elseif holder ~= token then
    return -1
end
for i = events_from, #ARGV do
    redis.call('PUBLISH', channel, ARGV[i])
    redis.call('XADD', events_stream, 'MAXLEN', '~', events_maxlen, '*', 'event', ARGV[i])
end
-- events_ttl_s '0': leave the stream's TTL alone.
if events_ttl_s ~= '0' then redis.call('EXPIRE', events_stream, events_ttl_s) end
return redis.call('EXISTS', cancel_key)
""",
)

FINISH = Script(
    "finish",
    keys=(
        "reply_key",
        "channel",
        "events_stream",
        "lease_key",
        "pending_set",
        "pending_record",
        "inflight_record",
        "inflight_set",
        "resends",
    ),
    args=(
        "reply",
        "reply_ttl_s",
        "terminal_event",
        "events_maxlen",
        "events_ttl_s",
        "token",
        "request_id",
        "waiting_chunk",
    ),
    body="""
-- One reply per request: 0 if one is stored already; then the lease check of EMIT.
if redis.call('EXISTS', reply_key) == 1 then return 0 end
local holder = redis.call('GET', lease_key)
if token == '' then
    if holder then return -2 end
elseif holder ~= token then
    return -1
end
redis.call('SET', reply_key, reply, 'EX', reply_ttl_s)
-- The request is answered: it is no longer pending (worker.state.pending).
redis.call('ZREM', pending_set, request_id)
redis.call('DEL', pending_record)
redis.call('HDEL', resends, request_id)
-- A coalesced chunk still waiting goes out before the terminal event.
if waiting_chunk ~= '' then
    redis.call('PUBLISH', channel, waiting_chunk)
    redis.call('XADD', events_stream, 'MAXLEN', '~', events_maxlen, '*', 'event', waiting_chunk)
end
redis.call('PUBLISH', channel, terminal_event)
redis.call('XADD', events_stream, 'MAXLEN', '~', events_maxlen, '*', 'event', terminal_event)
redis.call('EXPIRE', events_stream, events_ttl_s)
-- A leased writer releases its lease with the reply.
if token ~= '' then
    redis.call('DEL', lease_key, inflight_record)
    redis.call('ZREM', inflight_set, request_id)
end
return 1
""",
)

HAND_OFF = Script(
    "hand_off",
    keys=("pending_set", "pending_record", "lease_key", "inflight_record", "inflight_set"),
    args=("record", "pending_ttl_s", "sent_at_ms", "token", "request_id"),
    body="""
-- Record the message as pending before the lease goes: if the send then fails or this process
-- dies, a reaper finds the request pending, unleased and unqueued, and sends it.
redis.call('SET', pending_record, record, 'EX', pending_ttl_s)
redis.call('ZADD', pending_set, sent_at_ms, request_id)
if redis.call('GET', lease_key) == token then
    redis.call('DEL', lease_key, inflight_record)
    redis.call('ZREM', inflight_set, request_id)
    return 1
end
return 0
""",
)

# --- the reaper (worker.state.reaper, worker.state.pending) --------------------------------------

CLAIM_EXPIRED = Script(
    "claim_expired",
    keys=("inflight_set", "lease_key", "inflight_record", "deaths_key"),
    args=("request_id", "now_ms", "deaths_ttl_s"),
    body="""
-- Exactly one reaper wins the ZREM; a live lease means no claim. The claim counts a death of the
-- request (worker.state.deaths). Returns the record and the deaths so far.
local score = redis.call('ZSCORE', inflight_set, request_id)
if not score or tonumber(score) > tonumber(now_ms) then return false end
if redis.call('EXISTS', lease_key) == 1 then return false end
redis.call('ZREM', inflight_set, request_id)
local record = redis.call('GET', inflight_record)
redis.call('DEL', inflight_record)
local deaths = redis.call('HINCRBY', deaths_key, 'deaths', 1)
redis.call('EXPIRE', deaths_key, deaths_ttl_s)
return {record, deaths}
""",
)

RESTORE_ORPHAN = Script(
    "restore_orphan",
    keys=("unacked_index", "unacked", "lease_key", "reply_key", "inflight_record", "queue"),
    args=("tag", "ceil", "message"),
    body="""
-- Put one orphan back on its queue, unless its request started meanwhile (a lease, a reply or an
-- in-flight record exists) or another reaper already did.
local score = redis.call('ZSCORE', unacked_index, tag)
if not score or tonumber(score) > tonumber(ceil) then return 0 end
if redis.call('EXISTS', lease_key, reply_key, inflight_record) > 0 then return 0 end
redis.call('ZREM', unacked_index, tag)
if redis.call('HDEL', unacked, tag) == 0 then return 0 end
redis.call('RPUSH', queue, message)
return 1
""",
)

CLAIM_LOST = Script(
    "claim_lost",
    keys=("pending_set", "lease_key", "reply_key", "pending_record", "inflight_record", "resends"),
    args=("request_id", "seen_score", "now_ms", "pending_ttl_s"),
    body="""
-- Claim a lost request for resending: its score is still what this reaper saw (nobody sent it
-- since), and no lease, reply or in-flight record exists. The new score marks the resend, and
-- the resend count goes up. Returns the record and the count.
local score = redis.call('ZSCORE', pending_set, request_id)
if not score or tonumber(score) ~= tonumber(seen_score) then return false end
if redis.call('EXISTS', lease_key, reply_key, inflight_record) > 0 then return false end
redis.call('ZADD', pending_set, now_ms, request_id)
redis.call('HINCRBY', resends, request_id, 1)
redis.call('EXPIRE', resends, pending_ttl_s)
return {redis.call('GET', pending_record), redis.call('HGET', resends, request_id)}
""",
)

LEAD_SWEEP = Script(
    "lead_sweep",
    keys=("sweeper",),
    args=("token", "hold_ms"),
    body="""
-- Take or keep the sweeper's role: free, or already ours, it is ours for hold_ms more.
local holder = redis.call('GET', sweeper)
if holder and holder ~= token then return 0 end
redis.call('SET', sweeper, token, 'PX', hold_ms)
return 1
""",
)

ALL = (OPEN, RENEW, RELEASE, EMIT, FINISH, HAND_OFF, CLAIM_EXPIRED, RESTORE_ORPHAN, CLAIM_LOST, LEAD_SWEEP)
"""Every script, for tests."""
