"""The Python producer client: submit a request, follow its stream, wait for its reply, cancel.

It needs nothing of the worker's configuration, only the Redis URL. Following a stream reads
the Redis Stream ``cascade:events:{id}`` from its first entry and then blocks for new ones, so
a subscriber that joins late replays from the start and continues live with no gap and no
duplicate. ``AsyncCascadeClient`` offers the same on ``redis.asyncio``.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis
from celery import Celery
from kombu.utils.json import dumps as kombu_dumps
from pydantic import BaseModel

from tasks.contract import keys
from tasks.contract.schemas import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_QUEUE,
    IMAGE_TASK_NAME,
    REQUEST_ID_HEADER,
    SUBMITTED_AT_HEADER,
    TASK_NAME,
    ChatReply,
    ChatRequest,
    ImageReply,
    ImageRequest,
    StreamEvent,
)
from tasks.producer import pending, tracing  # noqa: F401 - tracing connects the publish hook that puts the trace context in each message

_Request = TypeVar("_Request", ChatRequest, ImageRequest)
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
CANCEL_TTL_S = 86_400
ROUTE_CACHE_S = 30.0
_BLOCK_MS = 1_000
_READ_COUNT = 500
# The worker's default cap on a task message's body (``CASCADE_MAX_MESSAGE_BYTES``).
# The body Celery sends is [args, kwargs, embed]; embed holds these canvas fields, all null.
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


class RequestTooLargeError(ValueError):
    """A request whose task message would exceed the workers' ``max_message_bytes``: workers
    would refuse it (``request_too_large``), so the client does not send it."""


def _redis_url(redis_url: str | None) -> str:
    return redis_url or os.environ.get("CASCADE_REDIS_URL") or DEFAULT_REDIS_URL


def build_request(request: ChatRequest | dict[str, Any] | None = None, **fields: Any) -> ChatRequest:
    """A validated ``ChatRequest`` with a ``request_id`` (a new UUID when none is given)."""
    return _with_id(ChatRequest, request, fields)


def build_image_request(request: ImageRequest | dict[str, Any] | None = None, **fields: Any) -> ImageRequest:
    """A validated ``ImageRequest`` with a ``request_id`` (a new UUID when none is given)."""
    return _with_id(ImageRequest, request, fields)


def _with_id(model: type[_Request], request: _Request | dict[str, Any] | None, fields: dict[str, Any]) -> _Request:
    data: dict[str, Any] = request.model_dump(exclude_none=True) if isinstance(request, model) else {}
    if isinstance(request, dict):
        data.update(request)
    data.update({k: v for k, v in fields.items() if v is not None})
    if data.get("request_id") is None:  # absent, or given as None
        data["request_id"] = uuid.uuid4().hex
    return model.model_validate(data)


def _max_message_bytes(given: int | None) -> int:
    if given is not None:
        return given
    configured = os.environ.get("CASCADE_MAX_MESSAGE_BYTES")
    return int(configured) if configured else DEFAULT_MAX_MESSAGE_BYTES


def message_bytes(kwargs: dict[str, Any]) -> int:
    """The size of the task message body Celery sends for ``kwargs``: what workers measure
    against ``max_message_bytes``."""
    body: str = kombu_dumps([[], kwargs, _EMBED])  # type: ignore[no-untyped-call]
    return len(body.encode("utf-8"))


def _read_events(response: Any) -> list[tuple[bytes, StreamEvent]]:
    """The (entry id, event) pairs of an XREAD response on one stream."""
    pairs: list[tuple[bytes, StreamEvent]] = []
    for _name, entries in response or []:
        for entry_id, fields in entries:
            pairs.append((entry_id, StreamEvent.model_validate_json(fields[keys.EVENT_FIELD.encode()])))
    return pairs


def _unseen_events(response: Any, last_id: bytes | str, next_seq: int) -> tuple[bytes | str, int, list[StreamEvent]]:
    """The events of an XREAD response from ``seq`` ``next_seq`` on, each ``seq`` once (a write
    retried after its reply was lost can store an event twice), with the entry id to read after
    and the next ``seq`` expected."""
    fresh = []
    for entry_id, event in _read_events(response):
        last_id = entry_id
        if event.seq >= next_seq:
            fresh.append(event)
            next_seq = event.seq + 1
    return last_id, next_seq, fresh


def _block_ms(give_up: float | None) -> int:
    """How long the next XREAD may block, given the caller's deadline."""
    if give_up is None:
        return _BLOCK_MS
    return max(1, min(_BLOCK_MS, int((give_up - time.monotonic()) * 1000)))


class CascadeClient:
    """Blocking producer client; see the module docstring."""

    def __init__(
        self, redis_url: str | None = None, *, queue: str | None = None, max_message_bytes: int | None = None
    ) -> None:
        """``max_message_bytes``: the workers' cap on a message body (default: the
        ``CASCADE_MAX_MESSAGE_BYTES`` environment variable, else the workers' default)."""
        url = _redis_url(redis_url)
        self.queue = queue
        self.max_message_bytes = _max_message_bytes(max_message_bytes)
        self._routes: dict[str, tuple[float, str]] = {}
        self.redis = redis.Redis.from_url(url, health_check_interval=30, retry_on_timeout=True)
        self._celery = Celery("cascade-producer", broker=url, set_as_current=False)
        self._celery.conf.update(task_serializer="json", accept_content=["json"], broker_connection_retry=True)

    def submit(
        self, request: ChatRequest | dict[str, Any] | None = None, *, queue: str | None = None, **fields: Any
    ) -> str:
        """Enqueue a chat request (a ChatRequest, a dict, or its fields as keywords); return its id.

        Raises ``RequestTooLargeError`` (nothing sent) for a request whose message would exceed
        ``max_message_bytes``."""
        chat_request = build_request(request, **fields)
        return self._send(TASK_NAME, chat_request.request_id or "", chat_request, chat_request.chain, queue)

    def submit_image(
        self, request: ImageRequest | dict[str, Any] | None = None, *, queue: str | None = None, **fields: Any
    ) -> str:
        """Enqueue an image request (``cascade.image``); return its id. The images land at
        ``cascade:image:{id}:{index}`` (``image_bytes``), the reply at ``cascade:reply:{id}``."""
        image_request = build_image_request(request, **fields)
        return self._send(IMAGE_TASK_NAME, image_request.request_id or "", image_request, image_request.chain, queue)

    def _send(self, task: str, request_id: str, request: BaseModel, chain: str, queue: str | None) -> str:
        kwargs = {"request": request.model_dump(mode="json", exclude_none=True)}
        size = message_bytes(kwargs)
        if size > self.max_message_bytes:
            raise RequestTooLargeError(
                f"request {request_id}: its message would be {size} bytes, over the workers' limit of "
                f"{self.max_message_bytes} (max_message_bytes)"
            )
        target = queue or self.queue or self.route(chain)
        headers = {SUBMITTED_AT_HEADER: time.time(), REQUEST_ID_HEADER: request_id}
        self._celery.send_task(task, kwargs=kwargs, queue=target, task_id=request_id, headers=headers)
        # After the send, off the path to the first token: a reply stored before this record
        # lands ends it at the next reaper pass, and a record a worker wrote meanwhile (handing
        # the request on) is kept. Submitting again with the same id is safe.
        pending.note_sent(self.redis, request_id, target, kwargs, keep_existing=True, task=task)
        return request_id

    def route(self, chain: str) -> str:
        """The queue of ``chain``'s first provider, as workers publish it in
        ``cascade:routes`` (cached for a while); ``chat`` if no worker said."""
        cached = self._routes.get(chain)
        if cached is not None and time.monotonic() - cached[0] < ROUTE_CACHE_S:
            return cached[1]
        raw = self.redis.hget(keys.ROUTES, chain)
        if not isinstance(raw, bytes):
            return DEFAULT_QUEUE  # no worker has said yet: ask again next time
        queue = raw.decode()
        self._routes[chain] = (time.monotonic(), queue)
        return queue

    def events(self, request_id: str, *, timeout_s: float | None = None) -> Iterator[StreamEvent]:
        """Every event of the request from ``seq`` 0, then live ones, up to the terminal event;
        each ``seq`` once, even if a retried write stored it twice.

        Raises ``TimeoutError`` if ``timeout_s`` passes first.
        """
        stream = keys.events_stream(request_id)
        last_id: bytes | str = "0-0"
        next_seq = 0
        give_up = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            response = self.redis.xread({stream: last_id}, count=_READ_COUNT, block=_block_ms(give_up))
            last_id, next_seq, fresh = _unseen_events(response, last_id, next_seq)
            for event in fresh:
                yield event
                if event.is_terminal:
                    return
            if not response and self.redis.exists(keys.reply_key(request_id)):
                # Finished long ago (its events expired, the reply is still there), unless it
                # finished just now: the reply and the terminal event land together, so read on.
                if not self.redis.xread({stream: last_id}, count=1):
                    return
                continue  # read it now, even if timeout_s has just passed
            if give_up is not None and time.monotonic() >= give_up:
                raise TimeoutError(f"request {request_id}: no terminal event within {timeout_s} s")

    def reply(self, request_id: str) -> ChatReply | None:
        """The stored reply, or None while the request is still running (or unknown)."""
        raw = self.redis.get(keys.reply_key(request_id))
        return ChatReply.model_validate_json(raw) if raw else None

    def wait(self, request_id: str, *, timeout_s: float | None = None) -> ChatReply:
        """Block until the request has a reply; raise ``TimeoutError`` after ``timeout_s``."""
        for event in self.events(request_id, timeout_s=timeout_s):
            if event.is_terminal and isinstance(event.reply, ChatReply):
                return event.reply
        reply = self.reply(request_id)
        if reply is None:
            raise TimeoutError(f"request {request_id}: no reply")
        return reply

    def image_reply(self, request_id: str) -> ImageReply | None:
        """The stored reply of an image request, or None while it runs (or is unknown)."""
        raw = self.redis.get(keys.reply_key(request_id))
        return ImageReply.model_validate_json(raw) if raw else None

    def wait_image(self, request_id: str, *, timeout_s: float | None = None) -> ImageReply:
        """Block until the image request has a reply; raise ``TimeoutError`` after ``timeout_s``."""
        for event in self.events(request_id, timeout_s=timeout_s):
            if event.is_terminal and isinstance(event.reply, ImageReply):
                return event.reply
        reply = self.image_reply(request_id)
        if reply is None:
            raise TimeoutError(f"request {request_id}: no reply")
        return reply

    def image_bytes(self, key: str) -> bytes | None:
        """The bytes of a generated image (``GeneratedImage.key``), or None once they expired."""
        raw = self.redis.get(key)
        return raw if isinstance(raw, bytes) else None

    def cancel(self, request_id: str) -> None:
        """Ask the worker to stop the request at its next chunk (reply ``cancelled``)."""
        self.redis.set(keys.cancel_key(request_id), "1", ex=CANCEL_TTL_S)

    def close(self) -> None:
        """Close the connections."""
        self.redis.close()
        self._celery.close()

    def __enter__(self) -> CascadeClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncCascadeClient:
    """The same client for asyncio programs (``redis.asyncio``); ``submit`` runs Celery's
    blocking send in a thread."""

    def __init__(
        self, redis_url: str | None = None, *, queue: str | None = None, max_message_bytes: int | None = None
    ) -> None:
        url = _redis_url(redis_url)
        self.redis = aioredis.Redis.from_url(url, health_check_interval=30, retry_on_timeout=True)
        self._sync = CascadeClient(url, queue=queue, max_message_bytes=max_message_bytes)

    async def submit(
        self, request: ChatRequest | dict[str, Any] | None = None, *, queue: str | None = None, **fields: Any
    ) -> str:
        """Enqueue a request; return its id (``RequestTooLargeError``: see ``CascadeClient.submit``)."""
        return await asyncio.to_thread(self._sync.submit, request, queue=queue, **fields)

    async def events(self, request_id: str, *, timeout_s: float | None = None) -> AsyncIterator[StreamEvent]:
        """Every event from ``seq`` 0, then live ones, up to the terminal event."""
        stream = keys.events_stream(request_id)
        last_id: bytes | str = "0-0"
        next_seq = 0
        give_up = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            response = await self.redis.xread({stream: last_id}, count=_READ_COUNT, block=_block_ms(give_up))
            last_id, next_seq, fresh = _unseen_events(response, last_id, next_seq)
            for event in fresh:
                yield event
                if event.is_terminal:
                    return
            if not response and await self.redis.exists(keys.reply_key(request_id)):
                if not await self.redis.xread({stream: last_id}, count=1):  # see CascadeClient.events
                    return
                continue
            if give_up is not None and time.monotonic() >= give_up:
                raise TimeoutError(f"request {request_id}: no terminal event within {timeout_s} s")

    async def reply(self, request_id: str) -> ChatReply | None:
        """The stored reply, or None."""
        raw = await self.redis.get(keys.reply_key(request_id))
        return ChatReply.model_validate_json(raw) if raw else None

    async def wait(self, request_id: str, *, timeout_s: float | None = None) -> ChatReply:
        """Wait for the reply; raise ``TimeoutError`` after ``timeout_s``."""
        async for event in self.events(request_id, timeout_s=timeout_s):
            if event.is_terminal and isinstance(event.reply, ChatReply):
                return event.reply
        reply = await self.reply(request_id)
        if reply is None:
            raise TimeoutError(f"request {request_id}: no reply")
        return reply

    async def cancel(self, request_id: str) -> None:
        """Ask the worker to stop the request."""
        await self.redis.set(keys.cancel_key(request_id), "1", ex=CANCEL_TTL_S)

    async def aclose(self) -> None:
        """Close the connections."""
        await self.redis.aclose()
        self._sync.close()

    async def __aenter__(self) -> AsyncCascadeClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
