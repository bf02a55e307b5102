"""A Celery consumer that puts every message it cannot process into ``cascade:dead``.

Celery's own consumer logs and acks undecodable messages (pickle, broken JSON) and rejects
malformed or unknown-task ones; this subclass records each in the dead-letter list first, so
nothing vanishes silently. It runs in the consumer (parent) process, which opens its own Redis
connection.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.consumer import Consumer

from worker.runtime import get_runtime

logger = logging.getLogger(__name__)


class DeadLetteringConsumer(Consumer):  # type: ignore[misc]
    """Celery's ``Consumer`` plus dead letters; see the module docstring."""

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        """A message whose body could not be decoded (wrong content type, broken JSON)."""
        reason = "content_disallowed" if type(exc).__name__ == "ContentDisallowed" else "undecodable"
        detail = f"{type(exc).__name__}: content type {message.content_type!r}"
        _dead_letter(reason, detail, message, message.body)
        super().on_decode_error(message, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        """A message that is not a task message at all."""
        _dead_letter("unknown_message", "not a Celery task message", message, body)
        super().on_unknown_message(body, message)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        """A task message for a task name this worker does not have."""
        name = (message.headers or {}).get("task")
        _dead_letter("unknown_task", f"unknown task {name!r}", message, body)
        super().on_unknown_task(body, message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        """A task message that is malformed."""
        _dead_letter("invalid_task", f"invalid task message: {type(exc).__name__}", message, body)
        super().on_invalid_task(body, message, exc)


def _dead_letter(reason: str, detail: str, message: Any, body: Any) -> None:
    headers = getattr(message, "headers", None) or {}
    delivery = getattr(message, "delivery_info", None) or {}
    try:
        get_runtime().dead_letters.push(
            reason,
            detail,
            body=body,
            task_id=headers.get("id") if isinstance(headers, dict) else None,
            queue=delivery.get("routing_key"),
        )
    except Exception:
        logger.exception("could not record a dead letter (%s)", reason)
