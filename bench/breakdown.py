"""Where a request's time goes: the figures behind BENCHMARKS.md's "Where the time goes".

    python -m bench.breakdown [--requests 80] [--ab 150] [--profile 500]

1. Stages of one request, from the events' own timestamps: the scripted provider (first chunk
   after 20 ms, then 2 ms apart) behind one worker; for each request, the time ``submit()``
   takes, when the task started (the reply's ``queued_ms``), when it built its ``start`` event,
   when it built its first chunk, and when a subscriber read that chunk. Medians, in ms from
   just before ``submit()``.
2. A/B of the producer's pending record (``worker.state.pending``): first token and total with and
   without it, interleaved on the same worker.
3. A cProfile of ``cascade.chat`` run eagerly (``apply``) against a real redis-server: time per
   request, and the functions that take the most of it; and what Celery's ``saferepr`` of one
   reply costs at its default ``resultrepr_maxsize`` (1,024) and at Cascade's (256).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import pstats
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from celery.utils.saferepr import saferepr

from bench.common import Stack, scripted_toml
from bench.overhead import CHUNK_SIZE, FIRST_MS, PACE_MS, TEXT, Subscriber, measure, through_cascade
from settings import ScriptedConfig, Settings
from tasks.contract import keys
from tasks.contract.schemas import ChatReply, StreamEvent
from tasks.producer import pending
from tasks.producer.client import CascadeClient
from worker.demo.local import LocalRedis
from worker.runtime import build_runtime, redis_client

CHAIN = "scripted"


def _config(stack: Stack) -> Path:
    toml = scripted_toml("steady", text=TEXT, chunk_size=CHUNK_SIZE, first_ms=FIRST_MS, pace_ms=PACE_MS)
    return stack.config(toml + f'[chains]\n{CHAIN} = ["steady"]\n')


def _stages(client: CascadeClient, rdb: redis.Redis, number: int) -> dict[str, float]:
    """One request's stages, in ms from just before ``submit()``."""
    request_id = f"breakdown-{number}"
    pubsub = rdb.pubsub()  # type: ignore[no-untyped-call]
    pubsub.subscribe(keys.stream_channel(request_id))
    pubsub.get_message(timeout=1)
    started = time.time()
    client.submit(request_id=request_id, prompt="hi", chain=CHAIN)
    submitted = time.time()
    seen = None
    while True:
        message = pubsub.get_message(timeout=30)
        if message is None or message["type"] != "message":
            continue
        event = StreamEvent.model_validate_json(message["data"])
        if event.type == "chunk" and seen is None:
            seen = time.time()
        if event.is_terminal:
            break
    pubsub.close()
    stream = [StreamEvent.model_validate_json(f[b"event"]) for _id, f in rdb.xrange(keys.events_stream(request_id))]
    reply = ChatReply.model_validate_json(rdb.get(keys.reply_key(request_id)) or b"{}")
    start = next(e for e in stream if e.type == "start")
    chunk = next(e for e in stream if e.type == "chunk")
    return {
        "submit() returned": (submitted - started) * 1000,
        "task started (queued_ms)": reply.meta.timings.queued_ms or 0.0,
        "start event built": (start.ts - started) * 1000,
        "first chunk built": (chunk.ts - started) * 1000,
        "first chunk read by a subscriber": ((seen or time.time()) - started) * 1000,
    }


class _WithoutRecord(CascadeClient):
    """The producer client without its pending record (the A/B's other arm)."""

    def submit(self, *args: Any, **kwargs: Any) -> str:
        real = pending.note_sent
        pending.note_sent = lambda *_a, **_k: None  # type: ignore[assignment]
        try:
            return super().submit(*args, **kwargs)
        finally:
            pending.note_sent = real


def stages_and_ab(requests: int, ab: int) -> str:
    """Parts 1 and 2 on one stack."""
    lines = []
    with Stack("breakdown") as stack:
        stack.cascade_worker(_config(stack))
        rdb = redis.Redis.from_url(stack.url)
        subscriber = Subscriber(stack.url)
        try:
            with CascadeClient(stack.url) as client, _WithoutRecord(stack.url) as bare:
                rows = [_stages(client, rdb, n) for n in range(requests + 5)][5:]  # 5 warm-up
                lines.append(f"stages of {requests} requests (median ms from just before submit()):")
                lines += [f"  {name}: {statistics.median(r[name] for r in rows):.2f}" for name in rows[0]]
                paths = {
                    "with the pending record": functools.partial(through_cascade, client, subscriber, CHAIN),
                    "without it": functools.partial(through_cascade, bare, subscriber, CHAIN),
                }
                results = measure(paths, ab, 10, seed=1)
                lines.append(f"A/B, {ab} interleaved requests each (median ms):")
                for name, timings in results.items():
                    first = statistics.median(t.ttft_s for t in timings) * 1000
                    total = statistics.median(t.total_s for t in timings) * 1000
                    lines.append(f"  {name}: first token {first:.2f}, total {total:.2f}")
        finally:
            subscriber.close()
            rdb.close()
    return "\n".join(lines)


def eager_profile(requests: int, top: int = 12) -> str:
    """Part 3: ``cascade.chat`` run eagerly against a real redis-server, under cProfile."""
    import tasks.chat as chat_module

    with tempfile.TemporaryDirectory(prefix="cascade-breakdown-") as workdir:
        server = LocalRedis(Path(workdir)).start()
        try:
            settings = Settings(
                redis_url=server.url,
                providers={"steady": ScriptedConfig(text="x" * 8, chunk_size=4)},
                chains={"default": ["steady"]},
            )
            runtime = build_runtime(settings, redis_client(settings), worker_name="breakdown/1")
            chat_module.get_runtime = lambda: runtime  # type: ignore[assignment]

            def run(number: int) -> None:
                request = {"request_id": f"eager-{number}", "prompt": "hi"}
                chat_module.chat.apply(kwargs={"request": request}, task_id=f"eager-{number}")

            for number in range(50):
                run(number)
            started = time.perf_counter()
            for number in range(50, 50 + requests):
                run(number)
            per_request_ms = (time.perf_counter() - started) / requests * 1000
            profile = cProfile.Profile()
            profile.enable()
            for number in range(50 + requests, 50 + 2 * requests):
                run(number)
            profile.disable()
            reply = json.loads(runtime.redis.get(keys.reply_key(f"eager-{50 + requests}")) or b"{}")
        finally:
            server.stop()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(top)
    reprs = []
    for maxsize in (1024, chat_module.chat.resultrepr_maxsize):
        started = time.perf_counter()
        for _ in range(requests):
            saferepr(reply, maxsize)
        reprs.append(f"  saferepr(reply, {maxsize}): {(time.perf_counter() - started) / requests * 1000:.3f} ms")
    return (
        f"eager cascade.chat: {per_request_ms:.2f} ms per request over {requests}\n"
        + "\n".join(reprs)
        + f"\n{out.getvalue()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=80)
    parser.add_argument("--ab", type=int, default=150)
    parser.add_argument("--profile", type=int, default=500)
    args = parser.parse_args()
    print(stages_and_ab(args.requests, args.ab))
    print(eager_profile(args.profile, top=25))


if __name__ == "__main__":
    main()
