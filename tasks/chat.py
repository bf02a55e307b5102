"""The Celery task ``cascade.chat``: one keyword argument, ``request``, a ChatRequest object.

Bad input never raises out of the task (so Celery never retries it): it becomes a dead letter,
plus an ``error`` event and a ``failed`` reply wherever there is a request id to report to.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Task, shared_task
from pydantic import ValidationError

from providers.errors import InvalidRequest, RequestError
from tasks.contract.schemas import SUBMITTED_AT_HEADER, TASK_NAME, HandOff, usable_request_id
from tasks.intake import read_request
from tasks.runner import RequestRunner, TaskContext, checked_handoff, task_message
from worker.boundary import rejection
from worker.runtime import WorkerRuntime, get_runtime
from worker.state.lease import LeaseLost
from worker.state.session import CelerySender, RunSession

logger = logging.getLogger(__name__)


# Celery writes repr(return value) for its log line and task events after every task, walking the
# reply up to 1,024 characters by default; the log keeps only the status (worker.telemetry.logs),
# which 256 characters always reach (a request id is 128 at most).
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
        message = task_message(request, handoff)
    except ValueError:
        failure = InvalidRequest("request cannot be written as JSON (nested too deeply, or invalid text)")
        return reject(runtime, context, failure, intake.request_id, kwargs["request"])

    session = RunSession.of(runtime, request.request_id or "", sender=CelerySender(self.app))
    runner = RequestRunner(runtime, request, context, handoff=handoff, session=session, message=message)
    try:
        outcome = runner.run()
    except LeaseLost:
        logger.warning("request %s was taken over by another worker", request.request_id)
        return {"request_id": request.request_id, "status": "taken_over"}
    if outcome is None:
        logger.info("request %s is running on another worker; dropping this copy", request.request_id)
        return {"request_id": request.request_id, "status": "duplicate"}
    if isinstance(outcome, HandOff):
        return {"request_id": request.request_id, "status": "handed_off", "queue_hops": outcome.queue_hops}
    return outcome.model_dump(mode="json")


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
