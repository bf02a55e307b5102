"""Every benchmark in one run, and BENCHMARKS.md rewritten: ``make bench``.

    python -m bench [--write BENCHMARKS.md] [--quick] [--skip local_model,...]

Runs, one after the other (each starts its own Redis and workers on loopback): the local
model (``bench.local_model``), overhead per request (``bench.overhead``), throughput
(``bench.throughput``), streaming rate (``bench.streaming``), footprint
(``bench.footprint``) and continuous batching (``bench.batching``); replaces each one's
section of the file, then writes a summary of every target with the total wall time.
``--quick`` uses small counts (a smoke test, not figures).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import batching, footprint, overhead, streaming, throughput
from bench.common import cpu_busy, flags, machine, settle, verdict, write_section

SUMMARY_HEADING = "## Summary:"


@dataclass(frozen=True)
class Benchmark:
    """How to run one benchmark and read its targets."""

    heading: str
    options: dict[str, Any]
    quick: dict[str, Any]
    run: Callable[..., dict[str, Any]]
    report: Callable[[dict[str, Any], str, tuple[float, float]], str]
    checks: Callable[[dict[str, Any]], list[dict[str, Any]]]


def _local_model_run(runs: int, tokens: int) -> dict[str, Any]:
    from bench import local_model

    return local_model.run(runs, tokens)


def _local_model_report(figures: dict[str, Any], command: str, busy: tuple[float, float]) -> str:
    from bench import local_model

    flag = " The machine was busy: other processes were running." if max(busy) >= 10 else ""
    return local_model.report(figures, command) + (
        f"\nCPU {busy[0]:.0f}% busy in the second before this benchmark started and {busy[1]:.0f}% in the "
        f"second after it ended.{flag}\n"
    )


def _local_model_checks(figures: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "target": "local model: tokens/s through Cascade >= 0.95x raw generate",
            "measured": f"{figures['ratio']:.3f}x",
            "ok": figures["ratio"] >= 0.95,
        },
        {
            "target": "local model: added first-token time < 50 ms",
            "measured": f"{figures['ttft_delta_ms']:+.1f} ms",
            "ok": figures["ttft_delta_ms"] < 50,
        },
    ]


BENCHMARKS: dict[str, Benchmark] = {
    "local_model": Benchmark(
        "## Local model:",
        {"runs": 7, "tokens": 64},
        {"runs": 2, "tokens": 16},
        _local_model_run,
        _local_model_report,
        _local_model_checks,
    ),
    "overhead": Benchmark(
        overhead.HEADING,
        {"requests": 200, "warmup": 10},
        {"requests": 20, "warmup": 3},
        overhead.run,
        overhead.report,
        overhead.checks,
    ),
    "throughput": Benchmark(
        throughput.HEADING,
        {"requests": 400, "rounds": 3, "coalesce_ms": 2.0},
        {"requests": 60, "rounds": 1, "coalesce_ms": 2.0},
        throughput.run,
        throughput.report,
        throughput.checks,
    ),
    "streaming": Benchmark(
        streaming.HEADING,
        {"chunks": 10_000, "rounds": 3, "coalesce_ms": 2.0},
        {"chunks": 1_000, "rounds": 1, "coalesce_ms": 2.0},
        streaming.run,
        streaming.report,
        streaming.checks,
    ),
    "footprint": Benchmark(
        footprint.HEADING,
        {"starts": 5},
        {"starts": 1},
        footprint.run,
        footprint.report,
        footprint.checks,
    ),
    "batching": Benchmark(
        batching.HEADING,
        {"tokens": 32, "levels": "1,4,8,16"},
        {"tokens": 4, "levels": "1,4"},
        batching.run,
        batching.report,
        batching.checks,
    ),
}


def summary(
    results: list[tuple[str, list[dict[str, Any]]]], command: str, wall_s: float, busy: dict[str, tuple[float, float]]
) -> str:
    """The summary section: every target, met or missed, how busy the machine was around each
    benchmark, and how long the whole run took."""
    around = ", ".join(f"{name} {before:.0f}%/{after:.0f}%" for name, (before, after) in busy.items())
    lines = [
        f"{SUMMARY_HEADING} every target of this run\n",
        f"Run {time.strftime('%Y-%m-%d %H:%M %Z')} on {machine()} by `{command}` in {wall_s / 60:.1f} minutes. "
        f"CPU busy (everything else) in the second before/after each benchmark: {around}"
        f"{' (busy: other processes were running)' if any(max(b) >= 10 for b in busy.values()) else ''}. "
        "Each section above names the measurement and its own command.\n",
        "| benchmark | target | measured | result |",
        "| --- | --- | --- | --- |",
    ]
    for name, checks in results:
        lines += [f"| {name} | {c['target']} | {c['measured']} | {verdict(c['ok'])} |" for c in checks]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", type=Path, help="rewrite these sections of the file (BENCHMARKS.md)")
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke test")
    parser.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    args = parser.parse_args()
    skipped = {name.strip() for name in args.skip.split(",") if name.strip()}
    unknown = skipped - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}; known: {', '.join(BENCHMARKS)}")
    command = "python -m bench" + (" --quick" if args.quick else "") + (f" --skip {args.skip}" if skipped else "")
    if args.write:
        command += f" --write {args.write}"
    started = time.monotonic()
    results: list[tuple[str, list[dict[str, Any]]]] = []
    busy_around: dict[str, tuple[float, float]] = {}
    for name, benchmark in BENCHMARKS.items():
        if name in skipped:
            continue
        options = benchmark.quick if args.quick else benchmark.options
        print(f"== {name} ({flags(options)})", flush=True)
        busy, begun = settle(), time.monotonic()
        figures = benchmark.run(**options)
        busy_around[name] = (busy, cpu_busy())
        section = benchmark.report(figures, f"{command}  # python -m bench.{name} {flags(options)}", busy_around[name])
        write_section(args.write, benchmark.heading, section)
        results.append((name, benchmark.checks(figures)))
        print(f"== {name} took {time.monotonic() - begun:.0f} s", flush=True)
    wall_s = time.monotonic() - started
    write_section(args.write, SUMMARY_HEADING, summary(results, command, wall_s, busy_around))
    print(f"all benchmarks: {wall_s:.0f} s")


if __name__ == "__main__":
    main()
