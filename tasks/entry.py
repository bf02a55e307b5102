"""What a Cascade task does with its Celery message before and after the run, for every task
(``cascade.chat``, ``cascade.image``): one keyword argument ``request`` (and ``handoff`` for a
chain continued from another queue), read by the task's intake; bad input becomes a dead letter
plus an ``error`` event and a ``failed`` reply of the task's kind wherever there is a request id
to report to, and never raises out of the task (so Celery never retries it); a valid request
runs in a ``tasks.run.Run`` of the task's kind, with a ``RunSession`` that hands off and is
resent as that task.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic

from celery import Task
from pydantic import ValidationError

from providers.errors import InvalidRequest, RequestError
from settings import Settings
from tasks.contract.schemas import SUBMITTED_AT_HEADER, HandOff, usable_request_id
from tasks.intake import Intake, Req
from tasks.run import Run, TaskContext, checked_handoff, task_message
from worker.boundary import rejection
from worker.runtime import WorkerRuntime
from worker.state.lease import LeaseLost
from worker.state.session import CelerySender, RunSession

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskKind(Generic[Req]):
    """One Cascade task: its name, how it reads its ``request``, and the run that serves it."""

    name: str
    read: Callable[[Any, str | None, Settings], Intake[Req]]
    runner: Callable[..., Run[Req, Any]]


def context_of(task: Task) -> TaskContext:
    """What Celery knows about the delivery of the message ``task`` is running."""
    delivery = getattr(task.request, "delivery_info", None) or {}
    submitted_at = getattr(task.request, SUBMITTED_AT_HEADER, None)
    return TaskContext(
        task_id=task.request.id,
        queue=delivery.get("routing_key"),
        submitted_at=float(submitted_at) if isinstance(submitted_at, (int, float)) else None,
        started_at_wall=time.time(),
        started_at=time.monotonic(),
        local_queues=_consumed_queues(task),
    )


def serve(task: Task, runtime: WorkerRuntime, kind: TaskKind[Req], args: Any, kwargs: Any) -> dict[str, Any]:
    """Run the message ``task`` received (``args``, ``kwargs``) as a ``kind`` request; return
    what the task returns: the stored reply as JSON, or the status of a copy that did not run."""
    context = context_of(task)
    if args or not {"request"} <= set(kwargs) <= {"request", "handoff"}:
        raw = kwargs.get("request")
        error: RequestError = InvalidRequest(
            f"{kind.name} takes one keyword argument 'request'; got {len(args)} positional "
            f"and keyword(s) {sorted(kwargs)}"
        )
        body = {"args": list(args), "kwargs": kwargs} if raw is None else raw
        return reject(runtime, context, error, None, body, task=kind.name)

    intake = kind.read(kwargs["request"], context.task_id, runtime.settings)
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
        return reject(runtime, context, failure, intake.request_id, kwargs["request"], task=kind.name)
    request = intake.request
    try:
        # Replies, events and resends are JSON: a request that cannot be written as JSON (nested
        # deeper than pydantic serialises, lone surrogates in its metadata) is refused here.
        message = task_message(request, handoff)
    except ValueError:
        failure = InvalidRequest("request cannot be written as JSON (nested too deeply, or invalid text)")
        return reject(runtime, context, failure, intake.request_id, kwargs["request"], task=kind.name)

    session = RunSession.of(runtime, request.request_id or "", sender=CelerySender(task.app), task=kind.name)
    runner = kind.runner(runtime, request, context, handoff=handoff, session=session, message=message)
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
    runtime: WorkerRuntime,
    context: TaskContext,
    error: RequestError,
    request_id: str | None,
    body: Any,
    *,
    task: str,
) -> dict[str, Any]:
    """Dead-letter a request that cannot run; report it on its stream and reply (of ``task``'s
    kind) if it has an id."""
    reply_to = request_id or usable_request_id(context.task_id)  # never a key built from an unusable id
    return rejection.reject(
        runtime,
        error,
        reply_to=reply_to,
        body=body,
        request_id=request_id,
        task_id=context.task_id,
        queue=context.queue,
        task=task,
    )
