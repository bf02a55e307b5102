"""Every Redis key name Cascade uses: first those of the public contract (DESIGN.md, "Redis
keys"), then, in a section of their own, the worker's internal ones.

Per-request keys are templates with ``{request_id}``; Cascade's own keys (sets, roles,
counters) never sit under a per-request prefix, so no request id names one of them.
tests/unit/test_keys.py tries every key here against every per-request template, and finds
no ``cascade:`` key name defined anywhere else.
"""

from __future__ import annotations

STREAM_CHANNEL = "cascade:stream:{request_id}"
EVENTS_STREAM = "cascade:events:{request_id}"
REPLY = "cascade:reply:{request_id}"
CANCEL = "cascade:cancel:{request_id}"
DEAD_LETTERS = "cascade:dead"
# Hash: chain name -> the queue of its first provider, written by workers at start.
ROUTES = "cascade:routes"
# Sorted set: request id -> when its message was last sent (ms), until it is answered; each
# member's record (queue and task kwargs) sits at PENDING_RECORD.
PENDING_SET = "cascade:pending"
PENDING_RECORD = "cascade:pending:{request_id}"

# The field of each entry of the events stream that holds the JSON StreamEvent.
EVENT_FIELD = "event"


def stream_channel(request_id: str) -> str:
    """Pub/sub channel of live events."""
    return STREAM_CHANNEL.format(request_id=request_id)


def events_stream(request_id: str) -> str:
    """Redis Stream holding every event, for replay."""
    return EVENTS_STREAM.format(request_id=request_id)


def reply_key(request_id: str) -> str:
    """String key of the final ChatReply JSON."""
    return REPLY.format(request_id=request_id)


def cancel_key(request_id: str) -> str:
    """Key a producer sets to cancel the request."""
    return CANCEL.format(request_id=request_id)


# String key of one generated image's bytes (cascade.image), with the reply's TTL.
IMAGE = "cascade:image:{request_id}:{index}"


def image_key(request_id: str, index: int) -> str:
    """Key of the bytes of image ``index`` of an image request."""
    return IMAGE.format(request_id=request_id, index=index)


# String key of a partial image's bytes (a preview some providers stream before image
# ``index`` is done): its own key, so a partial never stands where the finished image belongs.
PARTIAL_IMAGE = "cascade:image-partial:{request_id}:{index}:{partial_index}"


def partial_image_key(request_id: str, index: int, partial_index: int) -> str:
    """Key of the bytes of partial image ``partial_index`` of image ``index``."""
    return PARTIAL_IMAGE.format(request_id=request_id, index=index, partial_index=partial_index)


def pending_record(request_id: str) -> str:
    """String key of the queue and keyword arguments of ``request_id``'s last message."""
    return PENDING_RECORD.format(request_id=request_id)


# --- Cascade-internal keys ------------------------------------------------------------------
# Not part of the public contract: the worker's own bookkeeping (worker.state), listed here so
# that every key name lives in one module and tests/unit/test_keys.py can check them together.

# A request's lease: the token of the worker running it (a short TTL, renewed while it runs).
LEASE = "cascade:lease:{request_id}"
# The task message a running request was started from, to resend if its worker dies; its
# member in INFLIGHT_SET is scored by the lease's expiry (ms).
INFLIGHT_RECORD = "cascade:inflight:{request_id}"
INFLIGHT_SET = "cascade:inflight"
# Hash: a request's death count and its first run's start and deadline.
DEATHS = "cascade:deaths:{request_id}"
# Hash: resend counts of pending requests (outside PENDING_RECORD's prefix: no request id
# may name a key of Cascade's own).
RESENDS = "cascade:resends"
# The token of the reaper that sweeps pending records (one at a time).
SWEEPER = "cascade:sweeper"
# A provider cools down while this key exists; its recent failures, scored by time.
COOLDOWN = "cascade:cooldown:{provider_id}"
COOLDOWN_FAILURES = "cascade:cooldown:failures:{provider_id}"
# kombu's Redis transport keeps each delivered, unacknowledged message in the hash UNACKED
# (tag -> [message, exchange, routing key]) indexed by delivery time in UNACKED_INDEX (kombu's
# default names; the Celery app does not change them).
UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"


def lease_key(request_id: str) -> str:
    """The key holding the token of the worker running ``request_id``."""
    return LEASE.format(request_id=request_id)


def inflight_record(request_id: str) -> str:
    """The key of the message a running ``request_id`` was started from."""
    return INFLIGHT_RECORD.format(request_id=request_id)


def deaths_key(request_id: str) -> str:
    """The hash holding ``request_id``'s death count and its first run's start and deadline."""
    return DEATHS.format(request_id=request_id)


def cooldown_key(provider_id: str) -> str:
    """The key whose existence means ``provider_id`` cools down."""
    return COOLDOWN.format(provider_id=provider_id)


def cooldown_failures_key(provider_id: str) -> str:
    """The sorted set of ``provider_id``'s recent failures."""
    return COOLDOWN_FAILURES.format(provider_id=provider_id)
