"""The Celery task ``cascade.chat``: one keyword argument, ``request``, a ChatRequest object.

Bad input never raises out of the task (so Celery never retries it): it becomes a dead letter,
plus an ``error`` event and a ``failed`` reply wherever there is a request id to report to.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import redis
from celery import Task, shared_task
from pydantic import ValidationError

from providers.errors import InvalidRequest, RequestError
from tasks.contract.schemas import (
    DEFAULT_QUEUE,
    REQUEST_ID_HEADER,
    SUBMITTED_AT_HEADER,
    TASK_NAME,
    ChatRequest,
    HandOff,
    usable_request_id,
)
from tasks.intake import read_request
from tasks.runner import RequestRunner, TaskContext, checked_handoff
from worker.boundary import rejection
from worker.runtime import WorkerRuntime, get_runtime
from worker.state import pending
from worker.state.lease import LeaseLost, RequestLease

logger = logging.getLogger(__name__)


# Celery writes repr(return value) for its log line and task events after every task, walking the
# reply up to 1,024 characters (0.17 ms; 0.10 ms at 256: python -m bench.breakdown). The log keeps
# only the status (worker.telemetry.logs), which 256 characters always reach (a request id is 128 at most).
# https://docs.celeryq.dev/en/stable/reference/celery.app.task.html#celery.app.task.Task.resultrepr_maxsize
@shared_task(name=TASK_NAME, bind=True, resultrepr_maxsize=256)  # type: ignore[untyped-decorator]
def chat(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run one chat request through its chain and return the stored ``ChatReply`` as JSON."""
    runtime = get_runtime()
    delivery = getattr(self.request, "delivery_info", None) or {}
    submitted_at = getattr(self.request, SUBMITTED_AT_HEADER, None)
    context = TaskContext(
        task_id=self.request.id,
        queue=delivery.get("routing_key"),
        submitted_at=float(submitted_at) if isinstance(submitted_at, (int, float)) else None,
        started_at_wall=time.time(),
        started_at=time.monotonic(),
        local_queues=_consumed_queues(self),
    )
    if args or not {"request"} <= set(kwargs) <= {"request", "handoff"}:
        raw = kwargs.get("request")
        error: RequestError = InvalidRequest(
            f"cascade.chat takes one keyword argument 'request'; got {len(args)} positional "
            f"and keyword(s) {sorted(kwargs)}"
        )
        return reject(runtime, context, error, None, {"args": list(args), "kwargs": kwargs} if raw is None else raw)

    intake = read_request(kwargs["request"], context.task_id, runtime.settings)
    handoff = None
    if intake.error is None and intake.request is not None and "handoff" in kwargs:
        try:
            handoff = HandOff.model_validate(kwargs["handoff"])
            handoff = checked_handoff(handoff, runtime.settings.chains.get(intake.request.chain, []))
        except ValidationError:
            intake.error = InvalidRequest("invalid hand-off state")
        except ValueError as exc:
            intake.error = InvalidRequest(f"invalid hand-off state: {exc}")
    if intake.error is not None or intake.request is None:
        failure = intake.error or InvalidRequest("invalid request")
        return reject(runtime, context, failure, intake.request_id, kwargs["request"])
    request = intake.request
    try:
        # Replies, events and resends are JSON: a request that cannot be written as JSON (nested
        # deeper than pydantic serialises, lone surrogates in its metadata) is refused here.
        message = {"request": json.loads(request.model_dump_json(exclude_none=True))}
    except ValueError:
        failure = InvalidRequest("request cannot be written as JSON (nested too deeply, or invalid text)")
        return reject(runtime, context, failure, intake.request_id, kwargs["request"])

    def send_handoff(queue: str, state: HandOff) -> None:
        hand_off(self, runtime, lease, request, queue, state)

    # A redelivery or a resend of a request answered already finds its reply in the same round
    # trip that takes the lease (runner.open): one read on the path of every request, not two.
    lease = RequestLease(
        runtime.redis,
        request.request_id or "",
        ttl_s=runtime.settings.lease_ttl_s,
        record_ttl_s=runtime.settings.broker_visibility_timeout_s,
        worker=runtime.worker_name,
    )
    if handoff is not None:
        message["handoff"] = handoff.model_dump(mode="json")
    runner = RequestRunner(runtime, request, context, handoff=handoff, send_handoff=send_handoff, lease=lease)
    try:
        # Inside the try: whatever fails once the lease is taken must still let it go.
        if not runner.open((context.queue or DEFAULT_QUEUE, message)):
            logger.info("request %s is running on another worker; dropping this copy", request.request_id)
            return {"request_id": request.request_id, "status": "duplicate"}
        outcome = runner.run()
    except LeaseLost:
        logger.warning("request %s was taken over by another worker", request.request_id)
        return {"request_id": request.request_id, "status": "taken_over"}
    except (redis.ConnectionError, redis.TimeoutError):
        # Cut off from Redis before the request ended: releasing would drop its only record.
        # The lease lapses instead and a reaper sends the request again (worker.state.lease).
        lease.abandon()
        raise
    finally:
        lease.release()
    if isinstance(outcome, HandOff):
        return {"request_id": request.request_id, "status": "handed_off", "queue_hops": outcome.queue_hops}
    return outcome.model_dump(mode="json")


def hand_off(
    task: Task, runtime: WorkerRuntime, lease: RequestLease, request: ChatRequest, queue: str, state: HandOff
) -> None:
    """Send ``request`` on to ``queue`` with its hand-off ``state``, and give up its lease."""
    kwargs = {"request": request.model_dump(mode="json", exclude_none=True), "handoff": state.model_dump(mode="json")}
    # Recorded before the lease goes: if this process dies or the send fails from here on, a
    # reaper finds the request pending, unleased and unqueued, and sends it (worker.state.pending).
    # The lease goes before the send: the next queue's worker may take the message at once, and
    # would drop it as a duplicate of a lease still held.
    pending.note_sent(runtime.redis, request.request_id or "", queue, kwargs)
    lease.release()
    task.apply_async(kwargs=kwargs, queue=queue, headers={REQUEST_ID_HEADER: request.request_id})


def _consumed_queues(task: Task) -> frozenset[str] | None:
    """The queues this worker consumes, or None outside a worker (eager calls, tests)."""
    if task.request.is_eager:
        return None
    consume_from = getattr(task.app.amqp.queues, "consume_from", None)
    return frozenset(consume_from) if consume_from else None


def reject(
    runtime: WorkerRuntime, context: TaskContext, error: RequestError, request_id: str | None, body: Any
) -> dict[str, Any]:
    """Dead-letter a request that cannot run; report it on its stream and reply if it has an id."""
    reply_to = request_id or usable_request_id(context.task_id)  # never a key built from an unusable id
    return rejection.reject(
        runtime,
        error,
        reply_to=reply_to,
        body=body,
        request_id=request_id,
        task_id=context.task_id,
        queue=context.queue,
    )
