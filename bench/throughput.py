"""Throughput: requests per second one Cascade worker with 2 processes answers, against a no-op
Celery task on the same Redis, in the same run.

Cascade (``celery -A worker worker -c 2``) serves a zero-delay ``scripted`` provider streaming
20 chunks; the baseline (``celery -A bench.haystack_baseline worker -Q bench.noop -c 2``) runs
a task that does nothing, with the same delivery settings (JSON, late acks, prefetch 1) and a
result backend, as Cascade's app; Cascade runs twice, with coalescing off (``CASCADE_COALESCE_MS=0``)
and with the window given (2 ms, the default).
The workers run side by side; each round pushes a batch of
Celery protocol-2 messages onto the queue in one Redis pipeline (the producer is not what is
measured) and times from just before the push to the last ``date_done`` Celery stored. Rounds
alternate between the two; the warm-up round is dropped.

    python -m bench.throughput [--requests 400] [--rounds 3] [--coalesce-ms 2] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import base64
import json
import statistics
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast

import redis

from bench.common import (
    PROMPT,
    TEXT,
    Stack,
    bench_main,
    checks_table,
    coalesced_label,
    measured_by,
    scripted_toml,
    wait_until,
)
from bench.haystack_baseline import NOOP_QUEUE, NOOP_TASK
from tasks.contract.schemas import TASK_NAME

HEADING = "## Throughput:"
CONCURRENCY = 2
TARGET_RATIO = 0.5
COALESCED_QUEUE = "chat.coalesced"


def task_message(task: str, task_id: str, queue: str, kwargs: dict[str, Any]) -> bytes:
    """A Celery protocol-2 message as the Redis transport stores it (README, "Any other language")."""
    body = base64.b64encode(json.dumps([[], kwargs, {"callbacks": None, "errbacks": None}]).encode()).decode()
    message = {
        "body": body,
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": task, "id": task_id, "root_id": task_id, "retries": 0},
        "properties": {
            "correlation_id": task_id,
            "delivery_mode": 2,
            "body_encoding": "base64",
            "delivery_info": {"exchange": "", "routing_key": queue},
            "delivery_tag": task_id,
            "priority": 0,
        },
    }
    return json.dumps(message).encode()


def _timestamp(iso: str) -> float:
    """Unix time of Celery's ``date_done`` (UTC, with or without its offset)."""
    moment = datetime.fromisoformat(iso)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def run_batch(
    client: redis.Redis, task: str, queue: str, kwargs_of: Callable[[str], dict[str, Any]], count: int
) -> dict[str, float]:
    """Push ``count`` messages, wait for every result, return the rate and the span."""
    ids = [uuid.uuid4().hex for _ in range(count)]
    messages = [task_message(task, task_id, queue, kwargs_of(task_id)) for task_id in ids]
    result_keys = [f"celery-task-meta-{task_id}" for task_id in ids]
    pipe = client.pipeline(transaction=False)
    for message in messages:
        pipe.lpush(queue, message)
    started = time.time()
    pipe.execute()
    wait_until(lambda: client.exists(*result_keys) == count, timeout_s=120, what=f"{count} {task} results", poll_s=0.05)
    results = [json.loads(cast(bytes, raw)) for raw in client.mget(result_keys)]
    failed = [r for r in results if r["status"] != "SUCCESS"]
    if failed:
        raise RuntimeError(f"{len(failed)} {task} tasks failed: {failed[0]}")
    if task == TASK_NAME:
        bad = [r["result"] for r in results if r["result"].get("status") != "succeeded"]
        if bad:
            raise RuntimeError(f"{len(bad)} Cascade requests did not succeed: {bad[0]}")
    last = max(_timestamp(r["date_done"]) for r in results)
    return {"rate": count / (last - started), "span_s": last - started}


def run(requests: int, rounds: int, coalesce_ms: float) -> dict[str, Any]:
    """Start both workers, alternate batches, return the figures."""
    with Stack("throughput") as stack:
        scripted = scripted_toml("steady", text=TEXT, chunk_size=4, first_ms=0, pace_ms=0)
        config = stack.config(
            f'{scripted}[providers.steady_c]\n{scripted.split(chr(10), 1)[1]}queue = "{COALESCED_QUEUE}"\n'
            '[chains]\ndefault = ["steady"]\ncoalesced = ["steady_c"]\n'
        )
        stack.cascade_worker(config, concurrency=CONCURRENCY, env={"CASCADE_COALESCE_MS": "0"})
        coalescing = {"CASCADE_COALESCE_MS": str(coalesce_ms)}
        stack.cascade_worker(config, queues=COALESCED_QUEUE, concurrency=CONCURRENCY, env=coalescing)
        stack.celery_worker("bench.haystack_baseline", queues=NOOP_QUEUE, concurrency=CONCURRENCY)
        client = redis.Redis.from_url(stack.url)

        def kwargs_for(chain: str) -> Callable[[str], dict[str, Any]]:
            return lambda task_id: {"request": {"request_id": task_id, "prompt": PROMPT, "chain": chain}}

        batches: dict[str, Callable[[int], dict[str, float]]] = {
            "noop": lambda n: run_batch(client, NOOP_TASK, NOOP_QUEUE, lambda _id: {}, n),
            "cascade": lambda n: run_batch(client, TASK_NAME, "chat", kwargs_for("default"), n),
            "coalesced": lambda n: run_batch(client, TASK_NAME, COALESCED_QUEUE, kwargs_for("coalesced"), n),
        }
        for batch in batches.values():  # warm-up: worker start, first requests
            batch(max(20, requests // 10))
        measured: dict[str, list[dict[str, float]]] = {name: [] for name in batches}
        for round_number in range(rounds):
            order = list(batches) if round_number % 2 == 0 else list(reversed(batches))
            for name in order:
                measured[name].append(batches[name](requests))
        client.close()
    rates = {name: [m["rate"] for m in runs] for name, runs in measured.items()}
    medians = {name: statistics.median(values) for name, values in rates.items()}
    return {
        "requests": requests,
        "rounds": rounds,
        "coalesce_ms": coalesce_ms,
        "rates": rates,
        "medians": medians,
        "ratio": medians["cascade"] / medians["noop"],
        "coalesced_ratio": medians["coalesced"] / medians["noop"],
        "chunks": len(TEXT) // 4,
    }


def checks(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's target against the figures (coalescing off, and on)."""
    medians = figures["medians"]
    results = []
    for name, label in (("cascade", "off"), ("coalesced", coalesced_label(figures["coalesce_ms"]))):
        ratio = medians[name] / medians["noop"]
        results.append(
            {
                "target": f"throughput >= {TARGET_RATIO}x the no-op Celery task, coalescing {label}",
                "measured": f"{ratio:.3f}x ({medians[name]:.0f} vs {medians['noop']:.0f} req/s)",
                "ok": ratio >= TARGET_RATIO,
            }
        )
    return results


def report(figures: dict[str, Any], command: str, busy: tuple[float, float]) -> str:
    """The BENCHMARKS.md section."""
    medians, rates = figures["medians"], figures["rates"]

    def row(name: str, label: str) -> str:
        return f"| {label} | {medians[name]:.0f} | {', '.join(f'{rate:.0f}' for rate in rates[name])} |"

    lines = [
        f"{HEADING} Cascade vs a no-op Celery task, 2 worker processes\n",
        f"One worker with {CONCURRENCY} processes per path; Cascade serves a zero-delay `scripted` provider "
        f"streaming {figures['chunks']} chunks per request (each chunk an event on pub/sub and the events stream, "
        "with the cancel and lease checks), the baseline a task that does nothing, with the same delivery "
        f"settings and result backend. {figures['rounds']} alternating rounds of {figures['requests']} requests "
        "per path after a warm-up round; a round's messages are pushed in one pipeline and timed to the last "
        "result Celery stored. Rate = median over rounds.\n",
        measured_by(command, busy),
        "| path | req/s (median) | per round |",
        "| --- | --- | --- |",
        row("noop", "no-op Celery task"),
        row("cascade", f"Cascade, {figures['chunks']} chunk events per request (`CASCADE_COALESCE_MS=0`)"),
        row("coalesced", f"Cascade, coalescing {coalesced_label(figures['coalesce_ms'])}"),
    ]
    lines += checks_table(checks(figures))
    return "\n".join(lines) + "\n"


def main() -> None:
    """Entry point."""
    bench_main("throughput", __doc__, HEADING, run, report, requests=400, rounds=3, coalesce_ms=2.0)


if __name__ == "__main__":
    main()
