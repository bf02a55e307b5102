"""A Celery consumer that puts every message it cannot process into ``cascade:dead``.

Messages reach it through ``worker.boundary.transport``, whose screen lets through only well-formed
task messages of Cascade's own tasks, so none of the hooks here is expected to fire. They are
the net behind that screen: should Celery's consumer still refuse a message (a decode error,
an unknown task, an invalid message, or an exception in its handler), the message is
dead-lettered with the reason instead of only logged, and the worker goes on. It runs in the
consumer (parent) process, which opens its own Redis connection.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery.worker.consumer import Consumer
from kombu.exceptions import ContentDisallowed

from worker.runtime import get_runtime

logger = logging.getLogger(__name__)


class DeadLetteringConsumer(Consumer):  # type: ignore[misc]
    """Celery's ``Consumer`` plus dead letters; see the module docstring."""

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        """A message whose body could not be decoded."""
        reason = "content_disallowed" if isinstance(exc, ContentDisallowed) else "undecodable"
        _dead_letter(reason, f"{type(exc).__name__}: content type {message.content_type!r}", message, message.body)
        super().on_decode_error(message, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        """A message that is not a task message at all."""
        _dead_letter("unknown_message", "not a Celery task message", message, body)
        super().on_unknown_message(body, message)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        """A task message for a task name this worker does not have."""
        name = (message.headers or {}).get("task")
        _dead_letter("unknown_task", f"unknown task {str(name)[:100]!r}", message, body)
        super().on_unknown_task(body, message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        """A task message that is malformed."""
        reason = "content_disallowed" if isinstance(exc, ContentDisallowed) else "invalid_task"
        _dead_letter(reason, f"invalid task message: {type(exc).__name__}: {str(exc)[:200]}", message, body)
        super().on_invalid_task(body, message, exc)

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], None]:
        """Celery's handler, guarded: an exception it raises for one message (other than a lost
        connection) rejects that message as invalid instead of stopping the consumer."""
        handler = super().create_task_handler(*args, **kwargs)
        passthrough = tuple(self.connection_errors) + tuple(self.channel_errors)

        def on_task_received(message: Any) -> None:
            try:
                handler(message)
            except Exception as exc:
                if isinstance(exc, passthrough):
                    raise
                self.on_invalid_task(None, message, exc)

        return on_task_received


def _dead_letter(reason: str, detail: str, message: Any, body: Any) -> None:
    headers = getattr(message, "headers", None)
    headers = headers if isinstance(headers, dict) else {}
    delivery = getattr(message, "delivery_info", None) or {}
    task_id = headers.get("id")
    try:
        get_runtime().dead_letters.push(
            reason,
            detail,
            body=body if body is not None else getattr(message, "body", None),  # Celery passes None for v2
            task_id=task_id if isinstance(task_id, str) else None,
            queue=delivery.get("routing_key"),
        )
    except Exception:
        logger.exception("could not record a dead letter (%s)", reason)
