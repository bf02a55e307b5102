"""Overhead per request: time to first token and total time as a Redis subscriber sees them.

Two providers with a known pace (the first chunk after 20 ms, then 19 more 2 ms apart):

- ``scripted``: Cascade (producer -> Redis -> worker -> chunk events -> subscriber) against
  (a) the same ``ScriptedProvider`` called in this process, no queue;
- ``openai`` against a fake OpenAI-compatible server in its own process (``bench.fake_openai``):
  Cascade with a chain of two ``openai`` providers against (a) the same ``OpenAIChatProvider``
  called in this process, and (b) what a user would write instead: Haystack's
  ``FallbackChatGenerator`` over two ``OpenAIChatGenerator`` in a plain Celery task whose
  streaming callback publishes each chunk with redis-py (``bench.haystack_baseline``).

Every round runs each path once, in a shuffled order, so drift on a shared machine hits all
alike; warm-up rounds are dropped. The subscriber (``PSUBSCRIBE``, in this process) times the
first chunk and the terminal message from just before the request is sent.

    python -m bench.overhead [--requests 200] [--warmup 10] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import functools
import json
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery

from bench import fake_openai
from bench.common import (
    PROMPT,
    TEXT,
    Stack,
    Stats,
    bench_main,
    checks_table,
    measured_by,
    scripted_toml,
)
from bench.haystack_baseline import CHANNEL, HAYSTACK_QUEUE, HAYSTACK_TASK
from providers.base import ChatProvider, ProviderCall, StreamingChunk
from providers.registry import build_provider
from settings import ScriptedConfig
from settings.providers import OpenAIConfig
from tasks.contract import keys
from tasks.contract.schemas import ChatMessage
from tasks.producer.client import CascadeClient

CHUNK_SIZE, FIRST_MS, PACE_MS = 4, 20.0, 2.0
TTFT_TARGET_MS = 5.0
# Requests are sent one at a time, each this long after the previous one ended: a request
# meets an idle stack, as at moderate load (back-to-back load is bench.throughput's).
GAP_S = 0.02
HEADING = "## Overhead per request:"
PATHS = {"scripted": ("direct", "cascade"), "openai": ("direct", "cascade", "haystack")}


@dataclass(frozen=True)
class Timing:
    """One request: seconds to the first chunk and to the end, as the caller saw them."""

    ttft_s: float
    total_s: float


class Subscriber:
    """One pattern subscription on every request channel; times one request at a time."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.pubsub = self.client.pubsub()  # type: ignore[no-untyped-call]
        self.pubsub.psubscribe(keys.STREAM_CHANNEL.format(request_id="*"), CHANNEL.format(request_id="*"))
        for _ in range(2):
            self.pubsub.get_message(timeout=5)

    def follow(self, channel: str, started: float, timeout_s: float = 30.0) -> Timing:
        """Read ``channel``'s messages up to the terminal one; check the text arrived whole."""
        first: float | None = None
        text: list[str] = []
        give_up = time.monotonic() + timeout_s
        wanted = channel.encode()
        while time.monotonic() < give_up:
            message = self.pubsub.get_message(timeout=1.0)
            if message is None or message["type"] != "pmessage" or message["channel"] != wanted:
                continue
            now = time.perf_counter()
            event = json.loads(message["data"])
            if event["type"] == "chunk":
                first = first or now
                text.append(event["delta"])
            elif event["type"] == "done":
                if "".join(text) != TEXT or first is None:
                    raise RuntimeError(f"{channel}: the streamed text is not the expected one")
                return Timing(first - started, now - started)
            elif event["type"] in ("error", "cancelled"):
                raise RuntimeError(f"{channel}: {event}")
        raise TimeoutError(f"{channel}: no terminal message in {timeout_s} s")

    def close(self) -> None:
        """Close the connections."""
        self.pubsub.close()
        self.client.close()


def direct(provider: ChatProvider) -> Timing:
    """Baseline (a): the provider called in this process, no queue."""
    first: float | None = None

    def on_chunk(chunk: StreamingChunk) -> None:
        nonlocal first
        if chunk.content and first is None:
            first = time.perf_counter()

    started = time.perf_counter()
    call = ProviderCall(
        messages=[ChatMessage(role="user", content=PROMPT)],
        generation_kwargs={},
        stream=True,
        deadline=time.monotonic() + 60,
    )
    replies = provider.run(call, on_chunk)
    done = time.perf_counter()
    if replies[0].content != TEXT or first is None:
        raise RuntimeError(f"{provider.provider_id}: unexpected reply")
    return Timing(first - started, done - started)


def through_cascade(client: CascadeClient, subscriber: Subscriber, chain: str) -> Timing:
    """One request through Cascade, timed by the subscriber."""
    request_id = uuid.uuid4().hex
    started = time.perf_counter()
    client.submit(request_id=request_id, prompt=PROMPT, chain=chain)
    return subscriber.follow(keys.stream_channel(request_id), started)


def through_haystack(producer: Celery, subscriber: Subscriber) -> Timing:
    """Baseline (b): one request through the Haystack-in-Celery task."""
    request_id = uuid.uuid4().hex
    started = time.perf_counter()
    producer.send_task(
        HAYSTACK_TASK,
        kwargs={"request_id": request_id, "messages": [{"role": "user", "content": PROMPT}]},
        queue=HAYSTACK_QUEUE,
    )
    return subscriber.follow(CHANNEL.format(request_id=request_id), started)


def measure(paths: dict[str, Callable[[], Timing]], requests: int, warmup: int, seed: int) -> dict[str, list[Timing]]:
    """Run every path once per round, in a shuffled order, each request after a pause that lets
    the previous one's tail (acks, result writes) finish; drop the warm-up rounds."""
    shuffle = random.Random(seed)
    results: dict[str, list[Timing]] = {name: [] for name in paths}
    names = list(paths)
    for round_number in range(warmup + requests):
        shuffle.shuffle(names)
        for name in names:
            time.sleep(GAP_S)
            timing = paths[name]()
            if round_number >= warmup:
                results[name].append(timing)
    return results


def run(requests: int, warmup: int) -> dict[str, Any]:
    """Start the stack, measure both scenarios, return the figures (in ms)."""
    pace = fake_openai.Pace(TEXT, CHUNK_SIZE, FIRST_MS, PACE_MS)
    scripted = ScriptedConfig(text=TEXT, chunk_size=CHUNK_SIZE, first_chunk_delay_ms=FIRST_MS, chunk_delay_ms=PACE_MS)
    raw: dict[str, dict[str, list[Timing]]] = {}
    with Stack("overhead") as stack:
        server, base_url = fake_openai.start(pace, log=stack.log("fake-openai"))
        stack.adopt(server)
        openai_toml = f'type = "openai"\nmodel = "gpt-4.1-mini"\napi_base_url = "{base_url}"\ntimeout_s = 30\n'
        config = stack.config(
            scripted_toml("steady", text=TEXT, chunk_size=CHUNK_SIZE, first_ms=FIRST_MS, pace_ms=PACE_MS)
            + f"[providers.primary]\n{openai_toml}[providers.secondary]\n{openai_toml}"
            + '[chains]\nscripted = ["steady"]\nopenai = ["primary", "secondary"]\n'
        )
        stack.cascade_worker(config)
        stack.celery_worker("bench.haystack_baseline", queues=HAYSTACK_QUEUE, env={"BENCH_OPENAI_BASE_URL": base_url})
        openai_config = OpenAIConfig(model="gpt-4.1-mini", api_base_url=base_url, timeout_s=30)
        providers = {"scripted": build_provider("steady", scripted), "openai": build_provider("primary", openai_config)}
        producer = Celery("bench-producer", broker=stack.url, set_as_current=False)
        producer.conf.update(task_serializer="json", accept_content=["json"])
        subscriber = Subscriber(stack.url)
        try:
            with CascadeClient(stack.url) as client:
                # The first requests wait for the workers to start; not timed.
                through_cascade(client, subscriber, "scripted")
                through_haystack(producer, subscriber)
                for scenario, names in PATHS.items():
                    paths: dict[str, Callable[[], Timing]] = {
                        "direct": functools.partial(direct, providers[scenario]),
                        "cascade": functools.partial(through_cascade, client, subscriber, scenario),
                        "haystack": functools.partial(through_haystack, producer, subscriber),
                    }
                    raw[scenario] = measure({n: paths[n] for n in names}, requests, warmup, seed=len(raw))
        finally:
            subscriber.close()
            producer.close()
    return {"requests": requests, "warmup": warmup, "scenarios": _figures(raw)}


def _figures(raw: dict[str, dict[str, list[Timing]]]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for scenario, paths in raw.items():
        figures[scenario] = {
            name: {
                "ttft": Stats.of([t.ttft_s * 1000 for t in timings]),
                "total": Stats.of([t.total_s * 1000 for t in timings]),
            }
            for name, timings in paths.items()
        }
    return figures


def report(figures: dict[str, Any], command: str, busy: tuple[float, float]) -> str:
    """The BENCHMARKS.md section."""
    lines = [
        f"{HEADING} Cascade vs the direct call and Haystack in Celery\n",
        f"A provider with a known pace: first chunk after {FIRST_MS:g} ms, then {len(TEXT) // CHUNK_SIZE - 1} more "
        f"{PACE_MS:g} ms apart ({len(TEXT) // CHUNK_SIZE} chunks). {figures['requests']} timed requests per path "
        f"after {figures['warmup']} warm-up rounds; each round runs every path once in a shuffled order. Times in "
        "ms, from just before the request is sent to the first chunk / the terminal message a Redis subscriber "
        "(`PSUBSCRIBE`) reads; the direct call is timed around `provider.run` in the benchmark's process. "
        f"Requests go one at a time, each {GAP_S * 1000:g} ms after the previous one ended (an idle stack, "
        "as at moderate load; back-to-back load is the throughput benchmark's).\n",
        measured_by(command, busy),
        "| provider | path | n | first token p50 | first token p99 | total p50 | total p99 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    labels = {
        "direct": "(a) direct call, in-process",
        "cascade": "Cascade (1 worker process)",
        "haystack": "(b) Haystack FallbackChatGenerator in a Celery task",
    }
    for scenario, paths in figures["scenarios"].items():
        for name, stats in paths.items():
            ttft, total = stats["ttft"], stats["total"]
            lines.append(
                f"| {scenario} | {labels[name]} | {ttft.count} | {ttft.p50:.2f} | {ttft.p99:.2f} | "
                f"{total.p50:.2f} | {total.p99:.2f} |"
            )
    lines += checks_table(checks(figures))
    return "\n".join(lines) + "\n"


def checks(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets against the figures."""
    results = []
    for scenario, paths in figures["scenarios"].items():
        added = paths["cascade"]["ttft"].p50 - paths["direct"]["ttft"].p50
        results.append(
            {
                "target": f"{scenario}: added first-token time over the direct call at p50 <= {TTFT_TARGET_MS:g} ms",
                "measured": f"{added:+.2f} ms",
                "ok": added <= TTFT_TARGET_MS,
            }
        )
        if "haystack" in paths:
            for measure in ("ttft", "total"):
                ours, theirs = paths["cascade"][measure], paths["haystack"][measure]
                name = "first token" if measure == "ttft" else "total"
                results.append(
                    {
                        "target": f"{scenario}: Cascade {name} no slower than Haystack in Celery at p50 and p99",
                        "measured": f"ratio {ours.p50 / theirs.p50:.3f} at p50, {ours.p99 / theirs.p99:.3f} at p99",
                        "ok": ours.p50 <= theirs.p50 and ours.p99 <= theirs.p99,
                    }
                )
    return results


def main() -> None:
    """Entry point."""
    bench_main("overhead", __doc__, HEADING, run, report, requests=200, warmup=10)


if __name__ == "__main__":
    main()
