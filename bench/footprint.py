"""Footprint: memory and start-up time of an API-only Cascade worker (no torch imported),
with a bare Celery worker (``bench.haystack_baseline``'s no-op app) measured the same way.

Each start spawns ``celery -A ... worker -c 1`` with one request already queued. Start-up time
runs from the spawn to that request's result in Redis: the worker has imported its code,
connected, forked its pool process, and answered (for Cascade, a request whose first provider is
``openai``, so importing the SDK on first use is counted); the time to Celery's ``ready.`` log
line is shown beside it. Memory is read from ``/proc`` once the worker
has answered a request of each of its provider types (``openai`` against the fake server, and
``scripted``): the resident set (RSS) of the main process and of the pool process, and their
proportional set size together (PSS: pages shared after the fork are counted once). A worker
whose memory maps hold ``libtorch`` fails the run. Starts alternate between the two workers.

    python -m bench.footprint [--starts 5] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import statistics
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from bench import fake_openai
from bench.common import (
    PROMPT,
    TEXT,
    Stack,
    bench_main,
    checks_table,
    measured_by,
    scripted_toml,
    wait_until,
)
from bench.haystack_baseline import NOOP_QUEUE, NOOP_TASK
from bench.throughput import task_message
from tasks.contract.schemas import TASK_NAME
from worker.demo.local import stop_process

HEADING = "## Footprint:"
RSS_TARGET_MB = 150.0
STARTUP_TARGET_S = 2.0


def _kib(path: Path, field: str) -> float:
    for line in path.read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return 0.0


def memory(pid: int) -> dict[str, float]:
    """RSS and PSS (MB) of ``pid``; raises if the process has torch mapped."""
    proc = Path("/proc") / str(pid)
    if "libtorch" in (proc / "maps").read_text():
        raise RuntimeError(f"process {pid} has torch loaded")
    return {"rss": _kib(proc / "status", "VmRSS") / 1024, "pss": _kib(proc / "smaps_rollup", "Pss") / 1024}


def pool_children(pid: int) -> list[int]:
    """The pool processes of a Celery worker."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in children]


def _exists(client: redis.Redis, key: str) -> Callable[[], bool]:
    return lambda: bool(client.exists(key))


def start_and_measure(
    stack: Stack,
    client: redis.Redis,
    spawn: Callable[[], subprocess.Popen[bytes]],
    first: tuple[str, str, dict[str, Any]],
    more: list[tuple[str, str, dict[str, Any]]],
) -> dict[str, float]:
    """Queue ``first``, spawn the worker, time to its result; then run ``more`` and read memory."""

    def send(task: str, queue: str, kwargs: dict[str, Any]) -> str:
        task_id = uuid.uuid4().hex
        if task == TASK_NAME:
            kwargs = {"request": {**kwargs["request"], "request_id": task_id}}
        client.lpush(queue, task_message(task, task_id, queue, kwargs))
        return f"celery-task-meta-{task_id}"

    result = send(*first)
    started = time.perf_counter()
    worker = spawn()
    log = stack.log_paths[worker.pid]
    ready_s = None
    try:
        while not client.exists(result):
            if ready_s is None and b" ready." in log.read_bytes():
                ready_s = time.perf_counter() - started
            if time.perf_counter() - started > 60:
                raise TimeoutError("the worker did not answer its first request")
            time.sleep(0.005)
        startup_s = time.perf_counter() - started
        for task in more:
            wait_until(_exists(client, send(*task)), 60, "a request")
        main = memory(worker.pid)
        children = [memory(child) for child in pool_children(worker.pid)]
    finally:
        stop_process(worker)
    return {
        "ready_s": ready_s if ready_s is not None else startup_s,
        "startup_s": startup_s,
        "main_rss": main["rss"],
        "child_rss": max(child["rss"] for child in children),
        "pss": main["pss"] + sum(child["pss"] for child in children),
    }


def run(starts: int) -> dict[str, Any]:
    """Alternate starts of both workers; return the medians."""
    pace = fake_openai.Pace(TEXT, 4, 0, 0)
    with Stack("footprint") as stack:
        server, base_url = fake_openai.start(pace, log=stack.log("fake-openai"))
        stack.adopt(server)
        config = stack.config(
            scripted_toml("steady", text=TEXT, chunk_size=4, first_ms=0, pace_ms=0)
            + f'[providers.primary]\ntype = "openai"\nmodel = "gpt-4.1-mini"\napi_base_url = "{base_url}"\n'
            + '[chains]\ndefault = ["primary", "steady"]\nscripted = ["steady"]\n'
        )
        client = redis.Redis.from_url(stack.url)
        request = {"request": {"prompt": PROMPT, "chain": "default"}}
        scripted = {"request": {"prompt": PROMPT, "chain": "scripted"}}
        Task = tuple[str, str, dict[str, Any]]
        workers: dict[str, tuple[Callable[[], subprocess.Popen[bytes]], Task, list[Task]]] = {
            "cascade": (
                lambda: stack.cascade_worker(config),
                (TASK_NAME, "chat", request),
                [(TASK_NAME, "chat", scripted)],
            ),
            "celery": (
                lambda: stack.celery_worker("bench.haystack_baseline", queues=NOOP_QUEUE),
                (NOOP_TASK, NOOP_QUEUE, {}),
                [(NOOP_TASK, NOOP_QUEUE, {})],
            ),
        }
        samples: dict[str, list[dict[str, float]]] = {name: [] for name in workers}
        for number in range(starts + 1):  # the first start of each warms the disk cache: dropped
            for name, (spawn, first, more) in workers.items():
                sample = start_and_measure(stack, client, spawn, first, more)
                if number:
                    samples[name].append(sample)
        client.close()
    return {
        "starts": starts,
        "figures": {
            name: {key: statistics.median(s[key] for s in runs) for key in runs[0]} for name, runs in samples.items()
        },
        "startup_all": {name: [s["startup_s"] for s in runs] for name, runs in samples.items()},
    }


def checks(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets against the figures."""
    cascade = figures["figures"]["cascade"]
    biggest = max(cascade["main_rss"], cascade["child_rss"])
    return [
        {
            "target": f"API-only worker RSS < {RSS_TARGET_MB:g} MB per process",
            "measured": f"{biggest:.0f} MB (main {cascade['main_rss']:.0f}, pool {cascade['child_rss']:.0f})",
            "ok": biggest < RSS_TARGET_MB,
        },
        {
            "target": f"API-only worker start-up < {STARTUP_TARGET_S:g} s",
            "measured": f"{cascade['startup_s']:.2f} s",
            "ok": cascade["startup_s"] < STARTUP_TARGET_S,
        },
    ]


def report(figures: dict[str, Any], command: str, busy: tuple[float, float]) -> str:
    """The BENCHMARKS.md section."""
    rows = {"cascade": "Cascade API worker (`-Q chat`, openai + scripted)", "celery": "bare Celery worker (no-op)"}
    lines = [
        f"{HEADING} an API-only worker (no torch) vs a bare Celery worker\n",
        f"`celery -A ... worker -c 1`, started {figures['starts']} times each (alternating, after one start each "
        "that is dropped). Start-up = spawn to the answer of a request queued before the spawn; memory read "
        "from `/proc` after the worker answered a request of each provider type (Cascade's first request goes to "
        "`openai` against the fake server: the SDK is imported on first use). No process had torch mapped.\n",
        measured_by(command, busy),
        "| worker | `ready.` logged | start-up: first answer (median) | RSS main | RSS pool process | PSS both |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, label in rows.items():
        f = figures["figures"][name]
        lines.append(
            f"| {label} | {f['ready_s']:.2f} s | {f['startup_s']:.2f} s | {f['main_rss']:.0f} MB | "
            f"{f['child_rss']:.0f} MB | "
            f"{f['pss']:.0f} MB |"
        )
    lines += checks_table(checks(figures))
    return "\n".join(lines) + "\n"


def main() -> None:
    """Entry point."""
    bench_main("footprint", __doc__, HEADING, run, report, starts=5)


if __name__ == "__main__":
    main()
