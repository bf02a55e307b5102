"""Redis key names of the public contract (DESIGN.md, "Redis keys").

Per-request keys are templates with ``{request_id}``; Cascade's own keys (sets, roles,
counters) never sit under a per-request prefix, so no request id names one of them.
tests/unit/test_keys.py tries every module-level ``cascade:`` constant of the product against
every per-request template.
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


def pending_record(request_id: str) -> str:
    """String key of the queue and keyword arguments of ``request_id``'s last message."""
    return PENDING_RECORD.format(request_id=request_id)
