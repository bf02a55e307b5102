"""Turning whatever arrived as the task's argument into a valid request (a ``ChatRequest`` for
``cascade.chat``, an ``ImageRequest`` for ``cascade.image``), or a request-fatal error that
names the problem. Both tasks read their message the same way: the size cap, JSON, the
request id rules, the schema, the metadata bound, and a chain of the task's own kind."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import ValidationError

from providers.errors import InvalidRequest, RequestError, RequestTooLarge, UnknownChain
from providers.scoring.sampler import scoring_config
from settings import Settings
from tasks.contract.images import ImageRequest
from tasks.contract.messages import ImagePart
from tasks.contract.schemas import REQUEST_ID_PATTERN, ChatMessage, ChatRequest, usable_request_id

_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
_MAX_ERRORS_SHOWN = 5
MAX_METADATA_BYTES = 16_384
# generation_kwargs a request may set that count something: whole numbers from 1 to _MAX_COUNT.
_COUNT_FIELDS = ("max_new_tokens", "max_completion_tokens", "max_output_tokens", "min_new_tokens")
# ...and those the worker caps, with the setting that holds each cap.
_CAPPED_FIELDS = {"n": "max_choices", "num_beams": "max_num_beams"}
_MAX_COUNT = 1_000_000


Req = TypeVar("Req", ChatRequest, ImageRequest)


@dataclass
class Intake(Generic[Req]):
    """The outcome of reading a task message: a request, or an error with the id to report to."""

    request_id: str | None
    request: Req | None = None
    error: RequestError | None = None


def read_request(raw: Any, task_id: str | None, settings: Settings) -> Intake[ChatRequest]:
    """Validate ``raw`` (the ``request`` keyword of ``cascade.chat``) against the schema and
    the worker's limits.

    The reply goes to the producer's ``request_id`` when it is usable as a key, else to the
    Celery task id; ``request_id`` is None only when neither is usable.
    """
    return _read(raw, task_id, settings, ChatRequest, _check_limits)


def read_image_request(raw: Any, task_id: str | None, settings: Settings) -> Intake[ImageRequest]:
    """Validate ``raw`` (the ``request`` keyword of ``cascade.image``) as ``read_request`` does.
    The image parameters are the providers' to check against their models."""
    return _read(raw, task_id, settings, ImageRequest, lambda request, _settings: _check_metadata(request.metadata))


def _read(
    raw: Any, task_id: str | None, settings: Settings, schema: type[Req], check: Callable[[Req, Settings], None]
) -> Intake[Req]:
    request_id = usable_request_id(task_id)
    try:
        if isinstance(raw, (str, bytes)):
            # A str counts in UTF-8 bytes (its characters can take up to 4 each).
            size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", errors="surrogatepass"))
            if size > settings.max_message_bytes:
                raise RequestTooLarge(f"request of {size} bytes exceeds {settings.max_message_bytes}")
            raw = _parse_json(raw)
        if not isinstance(raw, dict):
            raise InvalidRequest(f"request must be a JSON object, got {type(raw).__name__}")
        producer_id = raw.get("request_id")
        if producer_id is not None:
            if not isinstance(producer_id, str) or not _REQUEST_ID.fullmatch(producer_id):
                raise InvalidRequest(f"request_id must match {REQUEST_ID_PATTERN}")
            request_id = producer_id
        try:
            request = schema.model_validate(raw)
        except ValidationError as exc:
            raise InvalidRequest(_describe(exc)) from None
        if request.request_id is None:
            if request_id is None:
                raise InvalidRequest("no request_id and no task id to stand in for it")
            request = request.model_copy(update={"request_id": request_id})
        check(request, settings)
        _check_chain(request.chain, settings, images=schema is ImageRequest)
    except RequestError as exc:
        return Intake(request_id=request_id, error=exc)
    except RecursionError:
        # Only a Python object (an eager call, a producer in-process) nests this deep: the JSON
        # decoder refuses such a message before it gets here.
        return Intake(request_id=request_id, error=InvalidRequest("request is nested too deeply"))
    return Intake(request_id=request.request_id, request=request)


def _parse_json(raw: str | bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest(f"request is not valid JSON: {type(exc).__name__}") from None


def _check_limits(request: ChatRequest, settings: Settings) -> None:
    messages = request.conversation
    if len(messages) > settings.max_messages:
        raise RequestTooLarge(f"{len(messages)} messages exceed the limit of {settings.max_messages}")
    chars = sum(message.text_chars() for message in messages)
    if chars > settings.max_input_chars:
        raise RequestTooLarge(f"{chars} characters of input exceed the limit of {settings.max_input_chars}")
    _check_images(messages, settings)
    generation = request.generation_kwargs
    _check_generation_limits({**(generation.model_extra or {}), "n": generation.n}, settings)
    if request.hallucination_score is not None:
        _check_scoring(request)
    _check_metadata(request.metadata)


def _check_metadata(metadata: dict[str, Any]) -> None:
    # metadata is echoed in the reply and the done event: keep it small.
    metadata_bytes = len(json.dumps(metadata, default=str).encode())
    if metadata_bytes > MAX_METADATA_BYTES:
        raise RequestTooLarge(f"metadata of {metadata_bytes} bytes exceeds the limit of {MAX_METADATA_BYTES}")


def _check_chain(chain: str, settings: Settings, *, images: bool) -> None:
    """The chain exists and is of the task's kind (an image chain for ``cascade.image``)."""
    if chain not in settings.chains:
        raise UnknownChain(f"chain: unknown chain {chain!r}")
    if settings.is_image_chain(chain) != images:
        kind, task = ("an image", "cascade.chat") if not images else ("a chat", "cascade.image")
        raise UnknownChain(f"chain: {chain!r} is {kind} chain, which {task} cannot run")


def _check_generation_limits(kwargs: dict[str, Any], settings: Settings) -> None:
    """Operator limits win over request fields: counts the request may set are whole numbers
    from 1, and those that multiply the work (``n``, ``num_beams``) stay within the worker's
    caps. A cap on generated tokens is not checked here: each provider cuts it down to its own
    (``providers.messages.merge_generation_kwargs``)."""
    for name in (*_COUNT_FIELDS, *_CAPPED_FIELDS):
        value = kwargs.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= _MAX_COUNT:
            raise InvalidRequest(f"generation_kwargs.{name} must be a whole number from 1 to {_MAX_COUNT}")
        cap = getattr(settings, _CAPPED_FIELDS[name]) if name in _CAPPED_FIELDS else None
        if cap is not None and value > cap:
            raise RequestTooLarge(f"generation_kwargs.{name} of {value} exceeds this worker's limit of {cap}")


def _check_images(messages: list[ChatMessage], settings: Settings) -> None:
    """The worker's caps on images, smaller than the schema's: how many, their bytes in all,
    and whether https URLs are taken. The error names the first image past a cap."""
    count = total = 0
    for number, message in enumerate(messages):
        if not isinstance(message.content, list):
            continue
        for position, part in enumerate(message.content):
            if not isinstance(part, ImagePart):
                continue
            where = f"messages.{number}.content.{position}.image_url"
            count += 1
            if count > settings.max_input_images:
                raise RequestTooLarge(f"{where}: more than this worker's limit of {settings.max_input_images} images")
            size = part.image_url.data_bytes()
            if size == 0 and not settings.allow_image_urls:
                raise InvalidRequest(f"{where}.url: this worker takes images as data: URLs only, not https URLs")
            total += size
            if total > settings.max_input_image_bytes:
                limit = settings.max_input_image_bytes
                raise RequestTooLarge(f"{where}: {total} bytes of images exceed this worker's limit of {limit}")


def _check_scoring(request: ChatRequest) -> None:
    """A ``hallucination_score`` option whose fields are each in range may still ask for too
    many decision calls in all (``n_samples * (m + 1)``): refused here, naming the field."""
    try:
        scoring_config(request.hallucination_score)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in ("hallucination_score", *first["loc"]))
        reason = str(first["msg"]).removeprefix("Value error, ")
        raise InvalidRequest(f"invalid request: {where}: {reason}") from None


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:_MAX_ERRORS_SHOWN]:
        where = ".".join(str(part) for part in error["loc"]) or "request"
        parts.append(f"{where}: {error['msg']}")
    more = exc.error_count() - _MAX_ERRORS_SHOWN
    if more > 0:
        parts.append(f"and {more} more")
    return "invalid request: " + "; ".join(parts)
