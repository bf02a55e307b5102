"""The slowest first tokens, taken apart: where Cascade's and Haystack-in-Celery's tails come from.

The openai scenario of ``bench.overhead`` (a chain of two ``openai`` providers against the fake
server, first chunk after 20 ms), with both workers started through probe apps
(``bench.tail_cascade``, ``bench.tail_haystack``; ``bench.tail_probe``) that record, per
request, when the consumer received the message, when the task started, the opening script's
round trip, when the first chunk came from the provider and when its write returned, and every
garbage collection in each worker process. Requests go one at a time, the paths interleaved in
a shuffled order per round (``bench.overhead.measure``).

The report gives, for each path, the median of each stage over all requests and over the
slowest 5 % by first token, then those slowest requests one by one, with the collections that
ran during them.

``--ab ARMS`` adds a second Cascade worker on its own queue that leaves ``ARMS`` out
(comma-separated: ``no-gc-freeze``, ``no-release``, ``no-hiredis``; ``bench.tail_cascade``),
interleaved with the first: ``cascade`` has them, ``cascade-<ARMS>`` does not.
``--ab no-gc-freeze,no-release`` is the worker as it was before both garbage-collection cuts.
``--repeat N`` runs the whole thing N times on fresh stacks.

``--gc-cost`` only times a full garbage collection in a process warmed up as a pool process
is, before and after ``gc.freeze()`` (``worker.signals.freeze_warm_heap``).

    python -m bench.tail [--requests 200] [--warmup 10] [--ab no-gc-freeze,no-release] [--repeat 1]
    python -m bench.tail --gc-cost
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery

from bench import fake_openai, tail_probe
from bench.common import PROMPT, TEXT, Stack, cpu_busy, percentile
from bench.haystack_baseline import CHANNEL, HAYSTACK_QUEUE, HAYSTACK_TASK
from bench.overhead import CHUNK_SIZE, FIRST_MS, PACE_MS, Subscriber, Timing, measure
from tasks.contract import keys
from tasks.producer.client import CascadeClient


@dataclass
class Sent:
    """One request as the benchmark saw it."""

    path: str
    task_id: str
    sent: float  # time.time() just before sending
    timing: Timing | None = None
    stamps: dict[str, float] = field(default_factory=dict)
    gcs: list[tuple[str, int, float]] = field(default_factory=list)  # (process, generation, ms) in the window

    @property
    def first_read(self) -> float:
        return self.sent + (self.timing.ttft_s if self.timing else 0.0)


CASCADE_STAGES = (
    ("sent", "admit_in"),
    ("admit_in", "admit_out"),
    ("admit_out", "deliver"),
    ("deliver", "received"),
    ("received", "prerun"),
    ("prerun", "open_start"),
    ("open_start", "open_end"),
    ("open_end", "chunk_in"),
    ("chunk_in", "chunk_out"),
    ("chunk_out", "read"),
)
HAYSTACK_STAGES = (
    ("sent", "deliver"),
    ("deliver", "received"),
    ("received", "prerun"),
    ("prerun", "chunk_in"),
    ("chunk_in", "chunk_out"),
    ("chunk_out", "read"),
)


def _config(stack: Stack, base_url: str, queues: list[str]) -> Path:
    toml = ""
    chains = ""
    for queue in queues:
        for role in ("primary", "secondary"):
            toml += (
                f'[providers.{role}_{queue}]\ntype = "openai"\nmodel = "gpt-4.1-mini"\n'
                f'api_base_url = "{base_url}"\ntimeout_s = 30\nqueue = "{queue}"\n'
            )
        chains += f'{queue} = ["primary_{queue}", "secondary_{queue}"]\n'
    return stack.config(toml + "[chains]\n" + chains)


def _load_probes(folder: Path) -> tuple[dict[str, dict[str, Any]], list[tuple[str, int, float, float]]]:
    """Per task id: the stamps of the main and the pool process; and every collection."""
    stamps: dict[str, dict[str, Any]] = {}
    gcs: list[tuple[str, int, float, float]] = []
    for path in folder.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            where = f"{'main' if record.get('main') else 'pool'}:{record['pid']}"
            gcs += [(where, gen, start, stop) for gen, start, stop in record.pop("gcs", [])]
            task = stamps.setdefault(record.get("task_id") or "", {})
            task.update({k: v for k, v in record.items() if isinstance(v, float)})
            task["main_pid" if record.get("main") else "pool_pid"] = float(record["pid"])
    return stamps, sorted(set(gcs), key=lambda g: g[2])


def run_once(requests: int, warmup: int, arm: str | None, seed: int) -> tuple[list[Sent], list[str]]:
    """One stack, every path interleaved: the requests with their stamps, and a line per full
    collection in any worker process (timed requests or not)."""
    pace = fake_openai.Pace(TEXT, CHUNK_SIZE, FIRST_MS, PACE_MS)
    sent: list[Sent] = []
    with Stack("tail") as stack:
        probes = stack.workdir / "probes"
        probes.mkdir()
        server, base_url = fake_openai.start(pace, log=stack.log("fake-openai"))
        stack.adopt(server)
        queues = ["chat"] + (["chat_b"] if arm else [])
        config = _config(stack, base_url, queues)
        env = {"CASCADE_REDIS_URL": stack.url, "CASCADE_CONFIG": str(config), "BENCH_TAIL_DIR": str(probes)}
        stack.celery_worker("bench.tail_cascade", queues="chat", env=env)
        if arm:
            stack.celery_worker("bench.tail_cascade", queues="chat_b", env={**env, "BENCH_TAIL_ARM": arm})
        hay_env = {"BENCH_OPENAI_BASE_URL": base_url, "BENCH_TAIL_DIR": str(probes)}
        stack.celery_worker("bench.tail_haystack", queues=HAYSTACK_QUEUE, env=hay_env)
        producer = Celery("bench-producer", broker=stack.url, set_as_current=False)
        producer.conf.update(task_serializer="json", accept_content=["json"])
        subscriber = Subscriber(stack.url)
        try:
            with CascadeClient(stack.url) as client:

                def cascade(path: str, chain: str) -> Timing:
                    request_id = uuid.uuid4().hex
                    record = Sent(path, request_id, time.time())
                    started = time.perf_counter()
                    client.submit(request_id=request_id, prompt=PROMPT, chain=chain)
                    record.timing = subscriber.follow(keys.stream_channel(request_id), started)
                    sent.append(record)
                    return record.timing

                def haystack() -> Timing:
                    request_id = uuid.uuid4().hex
                    record = Sent("haystack", request_id, time.time())
                    started = time.perf_counter()
                    producer.send_task(
                        HAYSTACK_TASK,
                        task_id=request_id,
                        kwargs={"request_id": request_id, "messages": [{"role": "user", "content": PROMPT}]},
                        queue=HAYSTACK_QUEUE,
                    )
                    record.timing = subscriber.follow(CHANNEL.format(request_id=request_id), started)
                    sent.append(record)
                    return record.timing

                paths: dict[str, Callable[[], Timing]] = {
                    "cascade": lambda: cascade("cascade", "chat"),
                    "haystack": haystack,
                }
                if arm:
                    paths[f"cascade-{arm}"] = lambda: cascade(f"cascade-{arm}", "chat_b")
                for name in paths:  # the first requests wait for the workers to start
                    paths[name]()
                sent.clear()
                measure(paths, requests, warmup, seed)
        finally:
            subscriber.close()
            producer.close()
        time.sleep(0.5)  # the last postrun lines
        stamps, gcs = _load_probes(probes)
    for record in sent:
        record.stamps = {"sent": record.sent, **stamps.get(record.task_id, {}), "read": record.first_read}
        record.gcs = [
            (where, gen, (stop - start) * 1000)
            for where, gen, start, stop in gcs
            if record.sent <= stop and start <= record.first_read
        ]
    # measure() drops warm-up rounds from its own results; drop them here too.
    by_path: dict[str, list[Sent]] = {}
    for record in sent:
        by_path.setdefault(record.path, []).append(record)
    timed = [record for records in by_path.values() for record in records[warmup:]]
    pids = {}
    for record in sent:
        for role in ("main_pid", "pool_pid"):
            if role in record.stamps:
                pids[int(record.stamps[role])] = record.path
    first = min((r.sent for r in timed), default=0.0)

    def landed(where: str, start: float, stop: float) -> str:
        pid = float(where.split(":")[1])
        for record in sent:
            if pid not in (record.stamps.get("pool_pid"), record.stamps.get("main_pid")) or not record.timing:
                continue
            if start <= record.first_read and stop >= record.sent:
                return "inside a request's wait for its first token"
            if start <= record.sent + record.timing.total_s and stop >= record.sent:
                return "inside a request, after its first token"
        return "between requests"

    full = [
        f"  {where} {pids.get(int(where.split(':')[1]), '')}: gen2 {(stop - start) * 1000:.1f} ms, "
        f"{start - first:+.1f} s from the first timed request, {landed(where, start, stop)}"
        for where, gen, start, stop in gcs
        if gen == 2
    ]
    return timed, full


def _stage_ms(record: Sent, start: str, end: str) -> float | None:
    if start in record.stamps and end in record.stamps:
        return (record.stamps[end] - record.stamps[start]) * 1000
    return None


def _median(values: list[float | None]) -> str:
    present = [v for v in values if v is not None]
    return f"{statistics.median(present):6.2f}" if present else "     -"


def _kind(code: int) -> str:
    return {tail_probe.REAPER: "reaper", tail_probe.TIMER: "timer"}.get(code, f"g{code}")


def report(records: list[Sent], busy: tuple[float, float]) -> str:
    """Stage medians (all, slowest 5 %) and the slowest requests, per path."""
    lines = [f"CPU {busy[0]:.0f}% busy before, {busy[1]:.0f}% after"]
    paths: dict[str, list[Sent]] = {}
    for record in records:
        paths.setdefault(record.path, []).append(record)
    summary = []
    for path, group in paths.items():
        ttfts = [r.timing.ttft_s * 1000 for r in group if r.timing]
        totals = [r.timing.total_s * 1000 for r in group if r.timing]
        summary.append(
            f"  {path:32s} n={len(group)} first token p50 {percentile(ttfts, 50):6.2f} p99 {percentile(ttfts, 99):6.2f}"
            f" max {max(ttfts):6.1f}; total p50 {percentile(totals, 50):6.2f} p99 {percentile(totals, 99):6.2f}"
            f" max {max(totals):6.1f}"
        )
        stages = HAYSTACK_STAGES if path == "haystack" else CASCADE_STAGES
        slow = sorted(group, key=lambda r: r.timing.ttft_s if r.timing else 0.0)[-max(1, len(group) // 20) :]
        lines.append(
            f"\n{path}: ms per stage: median, p95, count over 2 ms (of {len(group)}); median of the slowest {len(slow)}"
        )
        for start, end in stages:
            values = [v for r in group if (v := _stage_ms(r, start, end)) is not None]
            everyone = _median(list(values))
            p95 = f"{percentile(values, 95):6.2f}" if values else "     -"
            over = sum(1 for v in values if v > 2.0)
            slowest = _median([_stage_ms(r, start, end) for r in slow])
            lines.append(f"  {start:>10s} -> {end:<10s} {everyone} {p95} {over:4d}  {slowest}")
        for label, kinds in (
            ("a collection", {0, 1, 2}),
            ("a reaper pass", {tail_probe.REAPER}),
            ("a timer callback", {tail_probe.TIMER}),
        ):

            def hit(record: Sent, kinds: set[int] = kinds) -> bool:
                return any(g in kinds for _w, g, _ms in record.gcs)

            lines.append(
                f"  requests with {label} during them: {sum(map(hit, group))} of {len(group)}, "
                f"{sum(map(hit, slow))} of the slowest {len(slow)}"
            )
        lines.append("  slowest: ttft | " + " | ".join(f"{s}>{e}" for s, e in stages) + " | background (where what ms)")
        for record in slow:
            cells = " | ".join(f"{v:.1f}" if (v := _stage_ms(record, s, e)) is not None else "-" for s, e in stages)
            collections = ", ".join(f"{w.split(':')[0]} {_kind(g)} {ms:.2f}" for w, g, ms in record.gcs) or "none"
            lines.append(f"    {record.timing.ttft_s * 1000 if record.timing else 0:.1f} | {cells} | {collections}")
    return "\n".join(["first token per path:", *summary, *lines])


def gc_cost(runs: int = 5) -> str:
    """What one full collection costs in this process once it holds what a pool process
    warms up (Celery, the task, an ``openai`` provider), before and after ``gc.freeze()``."""
    import gc

    import tasks.chat  # noqa: F401 - the task module and all it imports, as in a pool process
    from providers.registry import build_provider
    from settings.providers import OpenAIConfig

    build_provider("warm", OpenAIConfig(model="gpt-4.1-mini", api_base_url="http://127.0.0.1:9/v1", timeout_s=3))
    lines = [f"tracked objects after warm-up: {len(gc.get_objects())}"]
    for label in ("unfrozen", "after gc.freeze()"):
        if label != "unfrozen":
            gc.freeze()
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            gc.collect()
            times.append((time.perf_counter() - started) * 1000)
        lines.append(f"full collection, {label}: median {statistics.median(times):.2f} ms of {runs}")
    gc.unfreeze()
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--ab", default=None, help="the arm a second Cascade worker leaves out (bench.tail_cascade)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--gc-cost", action="store_true", help="only time a full collection, unfrozen and frozen")
    args = parser.parse_args()
    if args.gc_cost:
        print(gc_cost())
        return
    for number in range(args.repeat):
        busy_before = cpu_busy()
        records, full = run_once(args.requests, args.warmup, args.ab, seed=number)
        print(f"=== run {number + 1} of {args.repeat} (pid {os.getpid()})")
        print(report(records, (busy_before, cpu_busy())))
        print("full collections in the workers:", *(full or ["  none"]), sep="\n", flush=True)


if __name__ == "__main__":
    main()
