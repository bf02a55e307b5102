"""Worker logs (worker/telemetry/logs.py): JSON lines with the request and trace ids, and Celery's own task
records stripped of the prompt and the reply text."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from celery.app import trace as celery_trace
from celery.worker.consumer import consumer as consumer_module
from opentelemetry.sdk.trace import TracerProvider

from worker.telemetry import logs


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Records of the ``cascade.test`` and Celery task loggers, formatted as the worker does."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.RequestContextFilter())
    loggers = [logging.getLogger("cascade.test"), *(logging.getLogger(n) for n in logs.CELERY_TASK_LOGGERS)]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_every_line_is_one_json_object_with_the_request_and_trace_ids(captured: io.StringIO) -> None:
    logger = logging.getLogger("cascade.test")
    logger.info("before the request")
    tracer = TracerProvider().get_tracer("test")
    with logs.request_logging("req-7"), tracer.start_as_current_span("process chat") as span:
        logger.warning("inside %s", "the request")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.exception("it failed")
    logger.info("after\nthe request")  # a newline stays inside its JSON string

    before, inside, failed, after = lines(captured)
    assert before["message"] == "before the request" and "request_id" not in before and "trace_id" not in before
    context = span.get_span_context()
    assert inside["request_id"] == failed["request_id"] == "req-7"
    assert inside["trace_id"] == format(context.trace_id, "032x")
    assert inside["span_id"] == format(context.span_id, "016x")
    assert (inside["level"], inside["logger"], inside["message"]) == ("WARNING", "cascade.test", "inside the request")
    assert inside["ts"].endswith("Z") and isinstance(inside["process"], int)
    assert "RuntimeError: boom" in failed["exc"]
    assert after["message"] == "after\nthe request" and "request_id" not in after
    assert len(captured.getvalue().splitlines()) == 4


def test_celerys_success_line_carries_neither_the_reply_nor_the_arguments(captured: io.StringIO) -> None:
    logs.install_task_data_filter()
    logs.install_task_data_filter()  # idempotent
    assert sum(isinstance(f, logs.TaskDataFilter) for f in logging.getLogger("celery.app.trace").filters) == 1
    retval = {"request_id": "req-9", "status": "succeeded", "replies": [{"content": "REPLY-MARKER text"}]}
    context = {
        "id": "req-9",
        "name": "cascade.chat",
        "return_value": repr(retval),
        "runtime": 0.25,
        "args": "[]",
        "kwargs": "{'request': {'prompt': 'PROMPT-MARKER'}}",
    }
    records: list[logging.LogRecord] = []
    spy = logging.Handler()
    spy.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("celery.app.trace").addHandler(spy)
    try:
        celery_trace.info(celery_trace.LOG_SUCCESS, context)  # exactly what Celery's tracer calls
    finally:
        logging.getLogger("celery.app.trace").removeHandler(spy)

    (line,) = lines(captured)
    assert line["message"] == "Task cascade.chat[req-9] succeeded in 0.25s: status=succeeded"
    assert line["task_id"] == "req-9"
    (record,) = records
    assert "MARKER" not in json.dumps(record.args) and "MARKER" not in json.dumps(record.data)  # type: ignore[attr-defined]
    assert "PROMPT-MARKER" in context["kwargs"]  # the filter works on a copy: Celery's dict is left alone


@pytest.mark.parametrize(
    ("template", "args"),
    [
        (
            consumer_module.MESSAGE_DECODE_ERROR,
            (
                ValueError(UnicodeDecodeError("utf-8", b"PROMPT-MARKER \xff", 14, 15, "invalid start byte")),
                "application/json",
                "utf-8",
                "{}",
                "PROMPT-MARKER",
            ),
        ),
        (consumer_module.UNKNOWN_FORMAT, ("body: 'PROMPT-MARKER'",)),
        (consumer_module.UNKNOWN_TASK_ERROR, (KeyError("t"), "PROMPT-MARKER", "{}", "{}")),
        (consumer_module.INVALID_TASK_ERROR, (ValueError("x"), "PROMPT-MARKER")),
    ],
    ids=["undecodable", "unknown-message", "unknown-task", "invalid-task"],
)
def test_celerys_lines_about_bad_messages_leave_the_body_out(template: str, args: tuple[Any, ...]) -> None:
    logs.install_task_data_filter()
    records: list[logging.LogRecord] = []
    spy = logging.Handler()
    spy.emit = records.append  # type: ignore[method-assign]
    consumer_logger = logging.getLogger(logs.CELERY_CONSUMER_LOGGER)
    consumer_logger.addHandler(spy)
    try:
        consumer_logger.error(template, *args)  # as Celery's consumer logs it
    finally:
        consumer_logger.removeHandler(spy)
    (record,) = records
    message = record.getMessage()
    assert "PROMPT-MARKER" not in message and "see cascade:dead" in message


def test_configure_json_logging_replaces_the_root_handlers(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = io.StringIO()
    monkeypatch.setattr("sys.__stderr__", stream)
    try:
        handler = logs.configure_json_logging("WARNING")
        assert root.handlers == [handler] and root.level == logging.WARNING
        with logs.request_logging("req-1"):
            logging.getLogger("any.library").warning("hello")
    finally:
        root.handlers, _ = saved
        root.setLevel(saved[1])
        logging.captureWarnings(False)
    (line,) = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert line["message"] == "hello" and line["request_id"] == "req-1" and line["logger"] == "any.library"


def test_json_logs_are_asked_for_with_cascade_log_format(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CASCADE_LOG_FORMAT", raising=False)
    assert not logs.json_logs_requested()
    monkeypatch.setenv("CASCADE_LOG_FORMAT", "JSON")
    assert logs.json_logs_requested()
