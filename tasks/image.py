"""The Celery task ``cascade.image``: one keyword argument, ``request``, an ImageRequest object.

It is ``cascade.chat``'s machinery with image providers: the same intake, lease, idempotency by
request id, fallback chain, retries, cooldowns, dead letters, events and reply store
(``tasks.entry``, ``tasks.run``); what is its own — the images' bytes in Redis and their
``image`` events — is ``tasks.image_runner.ImageRunner``'s.
"""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task

from tasks.contract.images import IMAGE_TASK_NAME, ImageRequest
from tasks.entry import TaskKind, serve
from tasks.image_runner import ImageRunner
from tasks.intake import read_image_request
from worker.runtime import get_runtime

IMAGE = TaskKind[ImageRequest](IMAGE_TASK_NAME, read_image_request, ImageRunner)


# As cascade.chat: the log keeps only the status of the returned reply (see tasks.chat).
@shared_task(name=IMAGE_TASK_NAME, bind=True, resultrepr_maxsize=256)  # type: ignore[untyped-decorator]
def image(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run one image request through its chain and return the stored ``ImageReply`` as JSON."""
    return serve(self, get_runtime(), IMAGE, args, kwargs)
