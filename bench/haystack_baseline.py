"""The baselines' own tiny Celery app: what a user would write instead of Cascade.

``bench.haystack_chat`` runs Haystack's ``FallbackChatGenerator`` over two
``OpenAIChatGenerator`` (built once per worker process, no SDK retries, as Cascade's chain of
two ``openai`` providers) and publishes each streamed chunk with redis-py on
``bench:stream:{request_id}``, then a ``done`` message; it returns the reply, which Celery's
result backend stores. ``bench.noop`` does nothing: the floor of a Celery task on this Redis.

The app uses the Celery settings Cascade uses for delivery (JSON only, late acks, prefetch 1),
so a comparison prices what each task does, not how Celery was tuned.

    BENCH_REDIS_URL=redis://127.0.0.1:6379/0 BENCH_OPENAI_BASE_URL=http://127.0.0.1:8000/v1 \
        celery -A bench.haystack_baseline worker -Q bench.haystack,bench.noop

Haystack is imported on the first chat task, so a worker that serves only ``bench.noop``
never loads it.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import redis
from celery import Celery

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
HAYSTACK_TASK = "bench.haystack_chat"
HAYSTACK_QUEUE = "bench.haystack"
NOOP_TASK = "bench.noop"
NOOP_QUEUE = "bench.noop"
CHANNEL = "bench:stream:{request_id}"
MODEL = "gpt-4.1-mini"

app = Celery("bench-baseline", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@functools.cache
def _redis() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL)


@functools.cache
def _generator() -> Any:
    """``FallbackChatGenerator([OpenAIChatGenerator, OpenAIChatGenerator])`` on the fake server."""
    os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")
    from haystack.components.generators.chat import FallbackChatGenerator, OpenAIChatGenerator
    from haystack.utils import Secret

    def one() -> OpenAIChatGenerator:
        return OpenAIChatGenerator(
            api_key=Secret.from_token("unused"),
            model=MODEL,
            api_base_url=os.environ["BENCH_OPENAI_BASE_URL"],
            timeout=30.0,
            max_retries=0,
        )

    generator = FallbackChatGenerator(chat_generators=[one(), one()])
    generator.warm_up()
    return generator


@app.task(name=HAYSTACK_TASK)  # type: ignore[untyped-decorator]
def haystack_chat(request_id: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    """Stream one answer through Haystack, publishing every chunk with redis-py."""
    from haystack.dataclasses import ChatMessage, StreamingChunk

    client = _redis()
    channel = CHANNEL.format(request_id=request_id)

    def on_chunk(chunk: StreamingChunk) -> None:
        if chunk.content:
            client.publish(channel, json.dumps({"type": "chunk", "delta": chunk.content}))

    builders = {"system": ChatMessage.from_system, "user": ChatMessage.from_user}
    conversation = [builders[message["role"]](message["content"]) for message in messages]
    try:
        result = _generator().run(messages=conversation, streaming_callback=on_chunk)
    except Exception as exc:
        client.publish(channel, json.dumps({"type": "error", "error": type(exc).__name__}))
        raise
    text = result["replies"][0].text or ""
    meta = {key: result["meta"][key] for key in ("successful_chat_generator_index", "total_attempts")}
    client.publish(channel, json.dumps({"type": "done", "reply": text, "meta": meta}))
    return {"reply": text, "meta": meta}


@app.task(name=NOOP_TASK)  # type: ignore[untyped-decorator]
def noop() -> None:
    """Nothing: what a Celery task costs on its own."""
