"""Ending a message that cannot run: its dead letter, and a ``failed`` reply with its ``error``
event wherever there is a request id to report to.

Both the task (a request that fails validation) and the consumer's message screen
(``worker.boundary.transport``: a message that never becomes a task) end messages here, so a rejection
looks the same whichever layer refused it.
"""

from __future__ import annotations

import logging
from typing import Any

from providers.errors import RequestError
from tasks.contract.images import IMAGE_TASK_NAME, ImageReply
from tasks.contract.schemas import TASK_NAME, ChainMeta, ChatReply, ErrorInfo
from worker.runtime import WorkerRuntime
from worker.state.publisher import EventPublisher

logger = logging.getLogger(__name__)


def reject(
    runtime: WorkerRuntime,
    error: RequestError,
    *,
    reply_to: str | None,
    body: Any,
    request_id: str | None = None,
    task_id: str | None = None,
    queue: str | None = None,
    reason: str | None = None,
    redelivery: bool = True,
    task: str = TASK_NAME,
) -> dict[str, Any]:
    """Dead-letter a message (with ``reason``, else the error's code) and, when ``reply_to``
    (an id already known to be usable as a key) is given, store a ``failed`` reply there with
    its terminal ``error`` event; return that reply as JSON.

    ``redelivery``: the message may be a redelivered copy of one rejected before (a task
    message acked late), so a reply already stored means it was handled: nothing is written
    again. Without it (a message the screen took off its queue, which nothing redelivers) the
    dead letter is always written and only the reply is skipped when one exists.

    The reply is of ``task``'s kind: an ``ImageReply`` for ``cascade.image``.
    """
    stored = runtime.replies.get(reply_to) if reply_to else None
    if stored is not None and redelivery:
        return stored.model_dump(mode="json")
    # %r and a bound: a refused message's task id is whatever its producer wrote.
    logger.warning("rejected message %r: %s", (request_id or task_id or "")[:128], reason or error.code)
    runtime.dead_letters.push(
        reason or error.code, error.message, body=body, request_id=request_id, task_id=task_id, queue=queue
    )
    info = ErrorInfo(type=error.code, message=error.message)
    if reply_to is None:
        return {"status": "failed", "error": {"type": error.code, "message": error.message}}
    if stored is not None:
        return stored.model_dump(mode="json")
    reply_type = ImageReply if task == IMAGE_TASK_NAME else ChatReply
    reply = reply_type(request_id=reply_to, status="failed", error=info, meta=ChainMeta(worker=runtime.worker_name))
    publisher = EventPublisher(
        runtime.redis,
        reply_to,
        store=runtime.replies,
        events_maxlen=runtime.settings.events_maxlen,
        events_ttl_s=runtime.settings.events_ttl_s,
        next_seq=EventPublisher.resume_seq(runtime.redis, reply_to),
    )
    if not publisher.finish("error", reply, error=info) and publisher.leased_elsewhere:
        # A worker runs a request of this id: this copy is only dead-lettered, its answer stands.
        return {"request_id": reply_to, "status": "duplicate", "error": info.model_dump(mode="json")}
    return reply.model_dump(mode="json")
