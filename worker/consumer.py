"""A Celery consumer that puts every message it cannot process into ``cascade:dead``.

Celery's own consumer logs and acks undecodable messages (pickle, broken JSON) and rejects
malformed or unknown-task ones; this subclass records each in the dead-letter list first, so
nothing vanishes silently. It runs in the consumer (parent) process, which opens its own Redis
connection.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery.exceptions import InvalidTaskError
from celery.worker.consumer import Consumer
from kombu.exceptions import ContentDisallowed, DecodeError

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
        """A task message that is malformed (or, via Celery, of a refused content type)."""
        reason = "content_disallowed" if isinstance(exc, ContentDisallowed) else "invalid_task"
        _dead_letter(reason, f"invalid task message: {type(exc).__name__}: {str(exc)[:200]}", message, body)
        super().on_invalid_task(body, message, exc)

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], None]:
        """Celery's handler, guarded: a task message whose headers or body do not have the shape
        of Celery's protocol 2 crashes Celery's consumer (an unhandled ValueError/KeyError in
        ``Request.__init__`` stops the worker and the message is restored, a poison pill) or
        fails inside the pool without a trace. Reject it as an invalid task instead."""
        handler = super().create_task_handler(*args, **kwargs)

        max_bytes = get_runtime().settings.max_message_bytes

        def on_task_received(message: Any) -> None:
            body = getattr(message, "body", b"")
            if isinstance(body, (bytes, str)) and len(body) > max_bytes:
                # Refused before the body is decoded into Python objects.
                detail = f"message body of {len(body)} bytes exceeds {max_bytes}"
                _dead_letter("request_too_large", detail, message, body[:2_000])
                message.reject_log_error(logger, self.connection_errors)
                return
            problem = _malformed(message, self.strategies)
            if problem is not None:
                self.on_invalid_task(None, message, InvalidTaskError(problem))
                return
            try:
                handler(message)
            except Exception as exc:
                if isinstance(exc, tuple(self.connection_errors) + tuple(self.channel_errors)):
                    raise
                self.on_invalid_task(None, message, exc)

        return on_task_received


def _malformed(message: Any, known_tasks: Any) -> str | None:
    """Why a protocol 2 task message cannot become a Celery request; None when it can (or when
    it is not one: Celery's own handler deals with decode errors, v1 and unknown messages)."""
    headers = getattr(message, "headers", None)
    if not isinstance(headers, dict) or "task" not in headers:
        return None
    if not isinstance(headers.get("id"), str):
        return "the task message has no 'id' header"
    if headers["task"] not in known_tasks:
        return None  # Celery's handler dead-letters it as an unknown task
    try:
        payload = message.payload
    except (DecodeError, ContentDisallowed):
        return None  # undecodable or refused content: Celery's handler reports it
    if isinstance(payload, dict) and "args" in payload:
        return None  # a hybrid protocol 1 body: Celery checks it itself
    if not (isinstance(payload, (list, tuple)) and len(payload) == 3):
        return "the task message body is not [args, kwargs, embed]"
    args, task_kwargs, embed = payload
    if not isinstance(args, (list, tuple)) or not isinstance(task_kwargs, dict):
        return "the task message body's args must be a list and kwargs an object"
    if embed is not None and not isinstance(embed, dict):
        return "the task message body's embed must be an object"
    return None


def _dead_letter(reason: str, detail: str, message: Any, body: Any) -> None:
    headers = getattr(message, "headers", None) or {}
    delivery = getattr(message, "delivery_info", None) or {}
    try:
        get_runtime().dead_letters.push(
            reason,
            detail,
            body=body if body is not None else getattr(message, "body", None),  # Celery passes None for v2
            task_id=headers.get("id") if isinstance(headers, dict) else None,
            queue=delivery.get("routing_key"),
        )
    except Exception:
        logger.exception("could not record a dead letter (%s)", reason)
