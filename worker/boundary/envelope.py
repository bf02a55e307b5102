"""What may reach Cascade's task handler: the screen every message popped off a queue passes.

``screen`` reads one raw queue entry (the bytes kombu's Redis transport would ``json.loads``)
and returns either the envelope to deliver, rebuilt from checked parts only, or a ``Refusal``
with a dead-letter reason. It never raises. What it lets through is a Celery protocol 2 task
message for one of Cascade's own tasks, JSON in base64, uncompressed, whose headers have the
types Celery's ``Request`` assumes and hold no scheduling, time-limit or canvas option, and
whose body is ``[args, kwargs, embed]`` no larger than ``max_message_bytes``.

Reasons: ``undecodable`` (not a JSON envelope, body not base64, UTF-8 or JSON),
``content_disallowed`` (another content type, encoding or body encoding), ``unknown_message``
(no ``task`` header), ``unknown_task``, ``invalid_task`` (a field of the wrong type or shape),
``unsupported_option`` (compression, ``eta``/``countdown``/``expires``, time limits, canvas
fields), ``request_too_large``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from celery.app.task import Context
from kombu.serialization import registry
from kombu.utils.json import loads as kombu_loads

from tasks.contract.images import IMAGE_TASK_NAME
from tasks.contract.schemas import REQUEST_ID_HEADER, REQUEST_ID_PATTERN, SUBMITTED_AT_HEADER, TASK_NAME

# The tasks a Cascade queue carries; a new Cascade task is added here (tests/unit/test_envelope.py
# fails while a registered ``cascade.*`` task is missing). The reaper resends only these.
CASCADE_TASKS = frozenset({TASK_NAME, IMAGE_TASK_NAME})

# An envelope this far over the body cap is not even parsed for the id to answer to.
HARD_LIMIT_FACTOR = 8
MAX_HEADERS_BYTES = 32_768
MAX_HEADER_TEXT_CHARS = 8_192
MAX_ID_CHARS = 255

_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
_HEADER_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,127}")

# Options Cascade does not honour: the worker's configuration decides when a request runs and
# for how long, and a request never triggers other tasks. Each must be absent or null (an
# empty ``stamps`` and ``timelimit`` ``[null, null]`` are what Celery sends by default).
_REFUSED = ("compression", "eta", "countdown", "expires", "timelimit", "time_limit", "soft_time_limit")
_CANVAS = ("callbacks", "errbacks", "chain", "chord", "group", "group_index", "link", "link_error")
_STAMPS = ("stamped_headers", "stamps")

_TEXT_OR_NULL = ("shadow", "root_id", "parent_id", "argsrepr", "kwargsrepr", "origin")
_KNOWN_HEADERS = frozenset(
    {"lang", "task", "id", "retries", "ignore_result", "replaced_task_nesting", "redelivered"}
    | {*_REFUSED, *_CANVAS, *_STAMPS, *_TEXT_OR_NULL, REQUEST_ID_HEADER, SUBMITTED_AT_HEADER}
)
# Every header becomes an attribute of ``task.request`` (Celery's Context): a producer may not
# set the ones that tell a task how it was called or where it runs.
_RESERVED_HEADERS = frozenset(name for name in vars(Context) if not name.startswith("_")) - _KNOWN_HEADERS
_EMBED_KEYS = frozenset({"callbacks", "errbacks", "chain", "chord"})


@dataclass(frozen=True)
class Refusal:
    """Why a message is not delivered, and what is known of it for its dead letter."""

    reason: str
    detail: str
    preview: Any  # what the dead letter keeps (bounded by DeadLetters): body text, or the raw entry
    task_id: str | None = None
    request_id: str | None = None  # the usable ``cascade_request_id`` header, where a reply goes
    task: str | None = None  # the Cascade task it names, whose kind of reply it gets


class _Refused(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def screen(raw: bytes | str, *, max_body_bytes: int) -> dict[str, Any] | Refusal:
    """The envelope to deliver for the queue entry ``raw``, or why it is refused."""
    size = len(raw)
    if size > max_body_bytes * HARD_LIMIT_FACTOR + MAX_HEADERS_BYTES:
        return Refusal("request_too_large", f"message of {size} bytes exceeds {max_body_bytes}", raw)
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        envelope = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return Refusal("undecodable", f"not a JSON message envelope ({type(exc).__name__})", raw)
    if not isinstance(envelope, dict):
        return Refusal("undecodable", f"not a message envelope: a JSON {type(envelope).__name__}", raw)
    if "body" not in envelope or "properties" not in envelope:
        return Refusal("undecodable", "not a message envelope: no 'body' or no 'properties'", raw)
    headers = envelope.get("headers")
    headers = headers if isinstance(headers, dict) else {}
    task_id = _text(headers.get("id"))
    request_id = _usable_id(headers.get(REQUEST_ID_HEADER))
    named = headers.get("task")
    task = named if isinstance(named, str) and named in CASCADE_TASKS else None
    try:
        _check_headers(envelope, headers)
        properties = _properties(envelope)
        _check_body(_body_bytes(envelope, max_body_bytes))
    except _Refused as refused:
        preview = _preview(envelope, raw, max_body_bytes)
        return Refusal(refused.reason, refused.detail, preview, task_id, request_id, task)
    except Exception as exc:  # noqa: BLE001 - a bug here must not stop the consumer: refuse what was not vetted
        detail = f"message could not be checked ({type(exc).__name__})"
        return Refusal("invalid_task", detail, _preview(envelope, raw, max_body_bytes), task_id)
    delivered: dict[str, Any] = {
        "body": envelope["body"],
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": properties,
    }
    return delivered


def _check_headers(envelope: dict[str, Any], headers: dict[str, Any]) -> None:
    if not isinstance(envelope.get("headers"), dict):
        raise _Refused("unknown_message", "not a Celery task message (no headers)")
    if "task" not in headers:
        raise _Refused("unknown_message", "not a Celery task message (no 'task' header)")
    task = headers["task"]
    if not isinstance(task, str):
        raise _Refused("invalid_task", f"the 'task' header must be a string, not {type(task).__name__}")
    task_id = headers.get("id")
    if not isinstance(task_id, str) or not 0 < len(task_id) <= MAX_ID_CHARS or not task_id.isprintable():
        raise _Refused("invalid_task", f"the task message has no 'id' header of 1-{MAX_ID_CHARS} printable characters")
    if task not in CASCADE_TASKS:
        raise _Refused("unknown_task", f"unknown task {task[:100]!r}")
    headers_bytes = len(json.dumps(headers))
    if headers_bytes > MAX_HEADERS_BYTES:
        raise _Refused("invalid_task", f"headers of {headers_bytes} bytes exceed {MAX_HEADERS_BYTES}")
    encoding = envelope.get("content-encoding")
    if envelope.get("content-type") != "application/json" or encoding not in ("utf-8", "utf8"):
        content_type = envelope.get("content-type")
        name = registry.type_to_name.get(content_type) if isinstance(content_type, str) else None
        detail = f"content type {_short(content_type)} ({name or 'unknown'}), encoding {_short(encoding)}"
        raise _Refused("content_disallowed", f"{detail}: only application/json in utf-8 is accepted")
    for name in (*_REFUSED, *_CANVAS, *_STAMPS):
        value = headers.get(name)
        if value is None or (name == "timelimit" and value == [None, None]) or (name in _STAMPS and value in ({}, [])):
            continue
        raise _Refused("unsupported_option", f"the {name!r} option is not supported (got {_short(value)})")
    for name, value in headers.items():
        _check_header(name, value)


def _check_header(name: str, value: Any) -> None:
    if name in _REFUSED or name in _CANVAS or name in _STAMPS or name in ("task", "id"):
        return  # checked above
    if name in _TEXT_OR_NULL or name == "lang":
        if value is not None and not isinstance(value, str):
            raise _Refused("invalid_task", f"the {name!r} header must be a string")
    elif name in ("retries", "replaced_task_nesting"):
        if value is not None and (type(value) is not int or not 0 <= value <= 1_000_000):
            raise _Refused("invalid_task", f"the {name!r} header must be a non-negative integer")
    elif name in ("ignore_result", "redelivered"):
        if value is not None and not isinstance(value, bool):
            raise _Refused("invalid_task", f"the {name!r} header must be true or false")
    elif name == REQUEST_ID_HEADER:
        if value is not None and _usable_id(value) is None:
            raise _Refused("invalid_task", f"the {name!r} header must match {REQUEST_ID_PATTERN}")
    elif name == SUBMITTED_AT_HEADER:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise _Refused("invalid_task", f"the {name!r} header must be a number")
    elif name in _RESERVED_HEADERS or not _HEADER_NAME.fullmatch(name):
        raise _Refused("invalid_task", f"the header {_short(name)} is reserved or not a valid name")
    elif not (value is None or isinstance(value, (bool, int, float)) or isinstance(value, str)):
        raise _Refused("invalid_task", f"the header {name!r} must be a string, a number or a boolean")
    if isinstance(value, str) and len(value) > MAX_HEADER_TEXT_CHARS:
        raise _Refused("invalid_task", f"the header {name!r} is longer than {MAX_HEADER_TEXT_CHARS} characters")


def _properties(envelope: dict[str, Any]) -> dict[str, Any]:
    """The properties kombu and Celery read, checked and copied (nothing else is kept)."""
    properties = envelope.get("properties")
    if not isinstance(properties, dict):
        raise _Refused("invalid_task", "the message has no properties object")
    if properties.get("body_encoding") != "base64":
        encoding = _short(properties.get("body_encoding"))
        raise _Refused("content_disallowed", f"body encoding {encoding}: only base64")
    info = properties.get("delivery_info")
    if not isinstance(info, dict) or not all(isinstance(info.get(k), str) for k in ("exchange", "routing_key")):
        raise _Refused("invalid_task", "the message's delivery_info must name an exchange and a routing key")
    tag = properties.get("delivery_tag")
    if not isinstance(tag, str) or not 0 < len(tag) <= MAX_ID_CHARS:
        raise _Refused("invalid_task", "the message's delivery_tag must be a string")
    priority = properties.get("priority", 0)
    if priority is not None and (type(priority) is not int or not 0 <= priority <= 255):
        raise _Refused("invalid_task", "the message's priority must be an integer from 0 to 255")
    checked: dict[str, Any] = {
        "body_encoding": "base64",
        "delivery_tag": tag,
        "delivery_info": {"exchange": info["exchange"], "routing_key": info["routing_key"]},
        "priority": priority or 0,
    }
    if isinstance(info.get("redelivered"), bool):
        checked["delivery_info"]["redelivered"] = info["redelivered"]
    for name in ("correlation_id", "reply_to"):
        value = properties.get(name)
        if value is not None and (not isinstance(value, str) or len(value) > MAX_ID_CHARS):
            raise _Refused("invalid_task", f"the message's {name} must be a string")
        if value is not None:
            checked[name] = value
    if type(properties.get("delivery_mode")) is int:
        checked["delivery_mode"] = properties["delivery_mode"]
    return checked


def _body_bytes(envelope: dict[str, Any], max_body_bytes: int) -> bytes:
    body = envelope.get("body")
    if not isinstance(body, str):
        raise _Refused("undecodable", f"the message body must be base64 text, not {type(body).__name__}")
    at_least = len(body) // 4 * 3 - 2  # the decoded length, give or take the padding
    if at_least > max_body_bytes:
        raise _Refused("request_too_large", f"message body of about {at_least} bytes exceeds {max_body_bytes}")
    try:
        decoded = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise _Refused("undecodable", "the message body is not valid base64") from None
    if len(decoded) > max_body_bytes:
        raise _Refused("request_too_large", f"message body of {len(decoded)} bytes exceeds {max_body_bytes}")
    return decoded


def _check_body(body: bytes) -> None:
    try:
        # As Celery will read it, kombu's JSON types included.
        payload = kombu_loads(body)  # type: ignore[no-untyped-call]
    except Exception as exc:  # noqa: BLE001 - whatever the decoder raises, the body is undecodable
        detail = f"the body is not UTF-8 JSON (content type application/json): {type(exc).__name__}"
        raise _Refused("undecodable", detail) from None
    if not (isinstance(payload, list) and len(payload) == 3):
        raise _Refused("invalid_task", "the task message body is not [args, kwargs, embed]")
    args, kwargs, embed = payload
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise _Refused("invalid_task", "the task message body's args must be a list and kwargs an object")
    if embed is None:
        return
    if not isinstance(embed, dict) or not set(embed) <= _EMBED_KEYS:
        raise _Refused("invalid_task", "the task message body's embed must be an object of canvas fields")
    for name, value in embed.items():
        if value is not None:
            raise _Refused("unsupported_option", f"the {name!r} option is not supported")


def _preview(envelope: dict[str, Any], raw: bytes | str, max_body_bytes: int) -> bytes | str:
    """The decoded body where there is one (what the producer sent), else the raw entry."""
    body = envelope.get("body")
    if isinstance(body, str) and len(body) // 4 * 3 <= max_body_bytes + 2:
        try:
            return base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            pass
    return raw


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _usable_id(value: Any) -> str | None:
    return value if isinstance(value, str) and _REQUEST_ID.fullmatch(value) else None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
