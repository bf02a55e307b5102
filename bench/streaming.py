"""Streaming rate: chunks per second one worker publishes for one long zero-delay stream,
against ``redis-benchmark`` PUBLISH without pipelining (one connection), in the same run.

One Cascade worker process streams a ``scripted`` text of many chunks with no delay; its rate
is the provider's chunks over the time from the first chunk event to the terminal event, read
back from the events stream (``ts``), so no subscriber takes CPU from the worker. The same
worker runs twice: with chunk coalescing off (``CASCADE_COALESCE_MS=0``) and with ``CASCADE_COALESCE_MS``
set (two workers, each consuming its own queue). The baseline publishes a payload of the size
of one chunk event, one command per round trip: ``redis-benchmark -c 1 -P 1 PUBLISH``. The
three alternate, round by round; the medians are compared.

    python -m bench.streaming [--chunks 10000] [--rounds 3] [--coalesce-ms 2] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import uuid
from typing import Any, cast

from bench.common import (
    PROMPT,
    Stack,
    bench_main,
    checks_table,
    coalesced_label,
    measured_by,
    wait_until,
)
from tasks.contract import keys
from tasks.contract.schemas import StreamEvent
from tasks.producer.client import CascadeClient

HEADING = "## Streaming rate:"
CHUNK_SIZE = 4
TARGET_RATIO = 0.5
COALESCED_QUEUE = "chat.coalesced"


def sample_payload() -> str:
    """A chunk event as Cascade publishes it, for the baseline's PUBLISH."""
    delta = "x" * CHUNK_SIZE
    event = StreamEvent(type="chunk", request_id=uuid.uuid4().hex, seq=1234, ts=1.7e9, delta=delta, provider="long")
    return event.model_copy(update={"attempt": 1}).model_dump_json(exclude_none=True)


def redis_benchmark(port: int, count: int, payload: str) -> float | None:
    """PUBLISH per second from ``redis-benchmark`` with one connection and no pipelining."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return None
    args = [binary, "-h", "127.0.0.1", "-p", str(port), "-c", "1", "-P", "1", "-n", str(count), "--csv"]
    output = subprocess.run([*args, "PUBLISH", "bench:publish", payload], capture_output=True, text=True, check=True)
    # The last line: "test","rps",...; the test's name holds the payload's unescaped quotes.
    last = output.stdout.strip().splitlines()[-1]
    return float(last.rsplit(",", 7)[1].strip('"'))


def stream_once(client: CascadeClient, chain: str, queue: str, chunks: int) -> dict[str, float]:
    """One long request; its chunk rate and event count, from the events' own timestamps."""
    request_id = client.submit(prompt=PROMPT, chain=chain, queue=queue, generation_kwargs={"max_tokens": chunks})
    # Poll for the reply (cheap) rather than follow the stream: a reader would take CPU from the worker.
    wait_until(lambda: bool(client.redis.exists(keys.reply_key(request_id))), 300, "the long stream", poll_s=0.05)
    reply = client.reply(request_id)
    if reply is None or reply.status != "succeeded" or len(reply.replies[0].content) != chunks * CHUNK_SIZE:
        raise RuntimeError(f"{chain}: the long stream did not succeed: {reply and (reply.status, reply.error)}")
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], client.redis.xrange(keys.events_stream(request_id)))
    events = [StreamEvent.model_validate_json(fields[keys.EVENT_FIELD.encode()]) for _id, fields in entries]
    chunk_events = [event for event in events if event.type == "chunk"]
    if "".join(event.delta or "" for event in chunk_events) != reply.replies[0].content:
        raise RuntimeError(f"{chain}: the streamed text is not the reply")
    first, last = chunk_events[0].ts or 0.0, events[-1].ts or 0.0
    return {"chunks_per_s": chunks / (last - first), "events": len(chunk_events), "seconds": last - first}


def run(chunks: int, rounds: int, coalesce_ms: float) -> dict[str, Any]:
    """Start two workers (coalescing off and on), alternate with redis-benchmark, return figures."""
    text = ("lorem ipsum dolor sit amet " * (chunks * CHUNK_SIZE // 27 + 1))[: chunks * CHUNK_SIZE]
    table = f'type = "scripted"\ntext = "{text}"\nchunk_size = {CHUNK_SIZE}\ntimeout_s = 300\n'
    payload = sample_payload()
    with Stack("streaming") as stack:
        config = stack.config(
            f'[providers.long]\n{table}[providers.long_c]\n{table}queue = "{COALESCED_QUEUE}"\n'
            '[chains]\nlong = ["long"]\nlong_c = ["long_c"]\n'
        )
        stack.cascade_worker(config, queues="chat", env={"CASCADE_COALESCE_MS": "0"})
        stack.cascade_worker(config, queues=COALESCED_QUEUE, env={"CASCADE_COALESCE_MS": str(coalesce_ms)})
        paths = {
            "off": ("long", "chat"),
            "coalesced": ("long_c", COALESCED_QUEUE),
        }
        results: dict[str, list[float]] = {"redis_benchmark": [], "off": [], "coalesced": []}
        events: dict[str, list[int]] = {"off": [], "coalesced": []}
        with CascadeClient(stack.url) as client:
            for chain, queue in paths.values():  # warm-up: worker start, first requests
                stream_once(client, chain, queue, chunks // 10)
            for _ in range(rounds):
                rate = redis_benchmark(stack.redis.port, 2 * chunks, payload)
                if rate is not None:
                    results["redis_benchmark"].append(rate)
                for name, (chain, queue) in paths.items():
                    measured = stream_once(client, chain, queue, chunks)
                    results[name].append(measured["chunks_per_s"])
                    events[name].append(int(measured["events"]))
    medians = {name: statistics.median(values) if values else None for name, values in results.items()}
    return {
        "chunks": chunks,
        "rounds": rounds,
        "coalesce_ms": coalesce_ms,
        "payload_bytes": len(payload),
        "rates": results,
        "medians": medians,
        "events": {name: statistics.median(values) for name, values in events.items()},
    }


def checks(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's target, for coalescing off and on."""
    baseline = figures["medians"]["redis_benchmark"]
    results = []
    labels = {"off": "coalescing off", "coalesced": f"coalescing {coalesced_label(figures['coalesce_ms'])}"}
    for name, label in labels.items():
        rate = figures["medians"][name]
        ratio = rate / baseline if baseline else None
        results.append(
            {
                "target": f"streaming rate >= {TARGET_RATIO}x redis-benchmark PUBLISH, {label}",
                "measured": f"{ratio:.3f}x ({rate:.0f} vs {baseline:.0f}/s)" if ratio else "no redis-benchmark",
                "ok": ratio is not None and ratio >= TARGET_RATIO,
            }
        )
    return results


def report(figures: dict[str, Any], command: str, busy: tuple[float, float]) -> str:
    """The BENCHMARKS.md section."""
    medians, rates, events = figures["medians"], figures["rates"], figures["events"]

    def per_round(name: str) -> str:
        return ", ".join(f"{rate:.0f}" for rate in rates[name]) or "n/a"

    baseline = medians["redis_benchmark"]
    lines = [
        f"{HEADING} one worker, one long stream, vs redis-benchmark PUBLISH\n",
        f"One request streaming {figures['chunks']} chunks of {CHUNK_SIZE} characters with no delay, one worker "
        "process; rate = chunks / time from the first chunk event to the terminal event (the events' own "
        "timestamps). Baseline: `redis-benchmark -c 1 -P 1 PUBLISH` with a "
        f"{figures['payload_bytes']}-byte payload (one chunk event), {2 * figures['chunks']} commands. "
        f"{figures['rounds']} alternating rounds; medians.\n",
        measured_by(command, busy),
        "| path | chunks/s (median) | per round | chunk events per request |",
        "| --- | --- | --- | --- |",
        f"| redis-benchmark PUBLISH, 1 connection, no pipelining | {baseline or 0:.0f} | "
        f"{per_round('redis_benchmark')} | - |",
        f"| Cascade, `CASCADE_COALESCE_MS=0` (coalescing off) | {medians['off']:.0f} | {per_round('off')} | "
        f"{events['off']:.0f} |",
        f"| Cascade, coalescing {coalesced_label(figures['coalesce_ms'])} | {medians['coalesced']:.0f} | "
        f"{per_round('coalesced')} | {events['coalesced']:.0f} |",
    ]
    lines += checks_table(checks(figures))
    return "\n".join(lines) + "\n"


def main() -> None:
    """Entry point."""
    bench_main("streaming", __doc__, HEADING, run, report, chunks=10_000, rounds=3, coalesce_ms=2.0)


if __name__ == "__main__":
    main()
