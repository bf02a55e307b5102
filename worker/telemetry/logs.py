"""Worker logs: one JSON object per line (``CASCADE_LOG_FORMAT=json``), the request id and trace
id on every line emitted while a request runs, and no prompt or reply text at INFO.

Celery logs each finished task as ``Task cascade.chat[id] succeeded in 0.4s: {return value}``,
and ``cascade.chat`` returns the whole ``ChatReply`` — the reply text included. The task's
``args``/``kwargs`` (the prompt) travel with that record and with the ``received`` one in
``record.data`` for custom handlers. ``TaskDataFilter`` replaces all three on Celery's records
before any handler sees them, whatever the log format.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import Any

from opentelemetry import trace

LOG_FORMAT_ENV = "CASCADE_LOG_FORMAT"

# Celery's loggers whose records carry a task's arguments or return value.
CELERY_TASK_LOGGERS = ("celery.app.trace", "celery.worker.strategy", "celery.worker.request")
# Celery's consumer logger: its records about unprocessable messages carry the message body.
CELERY_CONSUMER_LOGGER = "celery.worker.consumer.consumer"

_request_id: ContextVar[str | None] = ContextVar("cascade_request_id", default=None)
_STATUS = re.compile(r"""['"]status['"]: ['"](\w+)['"]""")


def json_logs_requested() -> bool:
    """True when ``CASCADE_LOG_FORMAT=json``."""
    return os.environ.get(LOG_FORMAT_ENV, "").strip().lower() == "json"


def bind_request(request_id: str | None) -> Token[str | None]:
    """Tag the records emitted from now on in this context with ``request_id``."""
    return _request_id.set(request_id)


def unbind_request(token: Token[str | None]) -> None:
    """Undo ``bind_request``."""
    _request_id.reset(token)


@contextmanager
def request_logging(request_id: str | None) -> Iterator[None]:
    """Tag every record emitted inside the block with ``request_id``."""
    token = bind_request(request_id)
    try:
        yield
    finally:
        unbind_request(token)


def current_request_id() -> str | None:
    """The request id of the records being emitted now, if any."""
    return _request_id.get()


class RequestContextFilter(logging.Filter):
    """Adds ``request_id``, ``trace_id`` and ``span_id`` to each record (None outside a request).

    Attach it to handlers, not loggers: a logger's filters skip records propagated from its
    children, a handler's see them all.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Annotate the record; never drops it."""
        record.request_id = _request_id.get()
        context = trace.get_current_span().get_span_context()
        record.trace_id = format(context.trace_id, "032x") if context.is_valid else None
        record.span_id = format(context.span_id, "016x") if context.is_valid else None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, process, request and trace ids,
    exception text. Only these fields: ``record.args`` and extras are never dumped, since they
    may hold a task's arguments."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        for key in ("request_id", "trace_id", "span_id"):
            value = getattr(record, key, None)
            if value:
                entry[key] = value
        data = getattr(record, "data", None)
        if isinstance(data, Mapping) and isinstance(data.get("id"), str):
            entry["task_id"] = data["id"]  # Celery's own task records (received, succeeded)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TaskDataFilter(logging.Filter):
    """Replaces the return value, args and kwargs in Celery's task records with a summary
    (``status=succeeded``), so neither the prompt nor the reply text reaches a log."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record's data in place; never drops it."""
        data = record.args if isinstance(record.args, Mapping) else None
        if data is None or not {"return_value", "args", "kwargs"} & set(data):
            return True
        safe = dict(data)
        if "return_value" in safe:
            found = _STATUS.search(str(safe["return_value"])[:300])
            safe["return_value"] = f"status={found.group(1)}" if found else "(not logged)"
        for key in ("args", "kwargs"):
            if key in safe:
                safe[key] = "(not logged)"
        record.args = safe
        if isinstance(getattr(record, "data", None), Mapping):
            record.data = safe
        return True


class MessageBodyFilter(logging.Filter):
    """Takes the message body out of the records Celery's consumer writes for a message it
    cannot process (undecodable, unknown, invalid): the body may hold a prompt, and it is kept,
    for whoever may read it, in ``cascade:dead`` (``worker.boundary.consumer``)."""

    # Celery's templates (celery.worker.consumer.consumer) -> the index of the body in args.
    _BODY_AT = {
        "Can't decode message body": 4,
        "Received and deleted unknown message": 0,
        "Received unregistered task": 1,
        "Received invalid task message": 1,
    }

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record's body argument in place; never drops it."""
        at = next((i for start, i in self._BODY_AT.items() if str(record.msg).startswith(start)), None)
        if at is not None and isinstance(record.args, tuple) and len(record.args) > at:
            args = list(record.args)
            args[at] = "(not logged; see cascade:dead)"
            # A decode error carries the undecodable bytes (the body again) in its repr.
            args = [f"{type(a).__name__} (details in cascade:dead)" if _carries_bytes(a) else a for a in args]
            record.args = tuple(args)
        return True


def _carries_bytes(value: Any, depth: int = 3) -> bool:
    """True if an exception holds bytes among its arguments (or its arguments' arguments)."""
    if isinstance(value, (bytes, bytearray)):
        return True
    if depth == 0 or not isinstance(value, BaseException):
        return False
    return any(_carries_bytes(arg, depth - 1) for arg in value.args)


def install_task_data_filter() -> None:
    """Put ``TaskDataFilter`` on Celery's task loggers and ``MessageBodyFilter`` on its
    consumer's (idempotent)."""
    for name in CELERY_TASK_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, TaskDataFilter) for f in logger.filters):
            logger.addFilter(TaskDataFilter())
    consumer = logging.getLogger(CELERY_CONSUMER_LOGGER)
    if not any(isinstance(f, MessageBodyFilter) for f in consumer.filters):
        consumer.addFilter(MessageBodyFilter())


def configure_json_logging(level: int | str = logging.INFO) -> logging.Handler:
    """Send every record to stderr as JSON, tagged with the request context; return the handler.

    Writes to the original stderr so a Celery that redirects ``sys.stderr`` into logging
    cannot loop. Python warnings become records too, so stderr stays pure JSON.
    """
    handler = logging.StreamHandler(sys.__stderr__)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestContextFilter())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)
    return handler
