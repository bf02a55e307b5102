"""The Celery task ``cascade.chat``: one keyword argument, ``request``, a ChatRequest object.

Bad input never raises out of the task (so Celery never retries it): it becomes a dead letter,
plus an ``error`` event and a ``failed`` reply wherever there is a request id to report to.
What every Cascade task does with its message is ``tasks.entry``'s; the chat run is
``tasks.runner.RequestRunner``.
"""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task

from tasks.contract.schemas import TASK_NAME, ChatRequest
from tasks.entry import TaskKind, serve
from tasks.intake import read_request
from tasks.runner import RequestRunner
from worker.runtime import get_runtime

CHAT = TaskKind[ChatRequest](TASK_NAME, read_request, RequestRunner)


# Celery writes repr(return value) for its log line and task events after every task, walking the
# reply up to 1,024 characters by default; the log keeps only the status (worker.telemetry.logs),
# which 256 characters always reach (a request id is 128 at most).
# https://docs.celeryq.dev/en/stable/reference/celery.app.task.html#celery.app.task.Task.resultrepr_maxsize
@shared_task(name=TASK_NAME, bind=True, resultrepr_maxsize=256)  # type: ignore[untyped-decorator]
def chat(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run one chat request through its chain and return the stored ``ChatReply`` as JSON."""
    return serve(self, get_runtime(), CHAT, args, kwargs)
