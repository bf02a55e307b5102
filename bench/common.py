"""What the benchmarks share: percentiles, the machine's description, a stack of loopback
processes (a redis-server, Cascade and baseline workers, the fake OpenAI server) that is torn
down on exit, and the BENCHMARKS.md section writer.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from bench.report import replace_section
from settings import Settings
from worker.demo.local import LocalRedis, start_worker, stop_process

REPO = Path(__file__).resolve().parents[1]
PROMPT = "What is Natural Language Processing? Answer in two sentences."
# The text every paced provider streams: 80 characters, 20 chunks of 4.
TEXT = "Natural Language Processing lets computers read, understand and produce language."[:80]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, interpolating between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Stats:
    """Median and p99 of a sample (in the unit of the sample), and its size."""

    count: int
    p50: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        """The stats of ``values``."""
        return cls(len(values), percentile(values, 50), percentile(values, 99))


def cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line naming the machine: OS, architecture, CPU, cores, Python."""
    return (
        f"{platform.system()} {platform.release()} {platform.machine()}, {cpu_model()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}"
    )


def _cpu_times() -> tuple[int, int]:
    """(idle, total) jiffies of all CPUs, from /proc/stat."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], sum(fields)  # idle + iowait


def cpu_busy(sample_s: float = 1.0) -> float:
    """How busy the CPUs are (percent, all cores) over ``sample_s``: taken between benchmarks,
    when none of the benchmark's own processes run, it is the load of everything else."""
    try:
        idle_before, total_before = _cpu_times()
        time.sleep(sample_s)
        idle_after, total_after = _cpu_times()
    except (OSError, ValueError, IndexError):
        return math.nan
    total = total_after - total_before
    return 100.0 * (1 - (idle_after - idle_before) / total) if total else math.nan


def settle(limit_s: float = 10.0, quiet_pct: float = 10.0) -> float:
    """Wait (up to ``limit_s``) for the CPUs to go quiet, e.g. while the previous benchmark's
    processes finish exiting; return the last ``cpu_busy()`` reading."""
    give_up = time.monotonic() + limit_s
    busy = cpu_busy()
    while busy >= quiet_pct and time.monotonic() < give_up:
        busy = cpu_busy()
    return busy


def measured_by(command: str, busy: tuple[float, float]) -> str:
    """The paragraph that says when, where and how a section was measured; ``busy`` is
    ``cpu_busy()`` in the second before the benchmark started and in the second after it ended."""
    flag = " (busy: other processes were running)" if max(busy) >= 10 else ""
    return (
        f"Measured {time.strftime('%Y-%m-%d %H:%M %Z')} on {machine()}; CPU {busy[0]:.0f}% busy in the second "
        f"before it started and {busy[1]:.0f}% in the second after it ended{flag}. Command:\n\n    {command}\n"
    )


def write_section(path: Path | None, heading_prefix: str, text: str) -> None:
    """Print ``text`` and, if ``path`` is given, replace that section of the file with it."""
    print(text)
    if path is not None:
        replace_section(path, heading_prefix, text)


def verdict(ok: bool) -> str:
    """``met`` or ``MISSED``."""
    return "met" if ok else "MISSED"


def checks_table(checks: Sequence[dict[str, Any]]) -> list[str]:
    """The lines of a section's table of targets: a blank line, the header, a row per check."""
    lines = ["", "| target | measured | result |", "| --- | --- | --- |"]
    lines += [f"| {c['target']} | {c['measured']} | {verdict(c['ok'])} |" for c in checks]
    return lines


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.01) -> None:
    """Poll ``predicate`` until it is true; raise ``TimeoutError`` naming ``what``."""
    give_up = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > give_up:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(poll_s)


def coalesced_label(window_ms: float) -> str:
    """``2 ms (the default)``, or the coalescing window a run was given."""
    default = Settings.model_fields["coalesce_ms"].default
    return f"{window_ms:g} ms" + (" (the default)" if window_ms == default else "")


def celery_worker_args(app: str, queues: str, concurrency: int) -> list[str]:
    """The command line of a Celery worker, with the flags ``worker.demo.local.start_worker`` uses."""
    args = [sys.executable, "-m", "celery", "-A", app, "worker", "-Q", queues, "-c", str(concurrency)]
    return [*args, "--loglevel", "INFO", "--without-mingle", "--without-gossip"]


class Stack:
    """A redis-server on a free loopback port and the processes a benchmark starts beside it;
    ``with Stack("name") as stack:`` stops every one of them by its pid on exit."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._tmp = tempfile.TemporaryDirectory(prefix=f"cascade-bench-{name}-")
        self.workdir = Path(self._tmp.name)
        self.redis = LocalRedis(self.workdir / "redis")
        self.processes: list[subprocess.Popen[bytes]] = []
        self.log_paths: dict[int, Path] = {}  # pid -> its log file
        self._logs: list[IO[bytes]] = []

    @property
    def url(self) -> str:
        """The Redis URL."""
        return self.redis.url

    def __enter__(self) -> Stack:
        self.redis.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for process in reversed(self.processes):
            stop_process(process)
        self.redis.stop()
        for log in self._logs:
            log.close()
        if exc is not None:
            self.print_logs()
        self._tmp.cleanup()

    def log(self, name: str) -> IO[bytes]:
        """A log file in the work folder, closed on exit."""
        handle = (self.workdir / f"{name}.log").open("ab")
        self._logs.append(handle)
        return handle

    def adopt(self, process: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        """Stop ``process`` with the stack."""
        self.processes.append(process)
        return process

    def config(self, toml: str, name: str = "cascade.toml") -> Path:
        """Write a Cascade TOML file into the work folder."""
        path = self.workdir / name
        path.write_text(toml)
        return path

    def cascade_worker(
        self, config: Path, *, queues: str = "chat", concurrency: int = 1, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``celery -A worker worker`` (``worker.demo.local.start_worker``) on this Redis."""
        log = self.log(f"cascade-{len(self.processes)}")
        process = start_worker(
            self.url, config, queues=queues, concurrency=concurrency, log=log, extra_env=env, cwd=REPO
        )
        self.log_paths[process.pid] = Path(log.name)
        return self.adopt(process)

    def celery_worker(
        self, app: str, *, queues: str, concurrency: int = 1, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``celery -A app worker`` (a baseline app reading ``BENCH_REDIS_URL``) on this Redis."""
        log = self.log(f"{app}-{len(self.processes)}")
        full_env = {**os.environ, "BENCH_REDIS_URL": self.url, **(env or {})}
        args = celery_worker_args(app, queues, concurrency)
        process = subprocess.Popen(
            args, env=full_env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
        )
        self.log_paths[process.pid] = Path(log.name)
        return self.adopt(process)

    def print_logs(self, lines: int = 30) -> None:
        """Print the tail of every log (after a failure)."""
        for path in sorted(self.workdir.glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            print(f"--- {path.name} ---\n" + "\n".join(tail), file=sys.stderr)


def scripted_toml(provider_id: str, *, text: str, chunk_size: int, first_ms: float, pace_ms: float) -> str:
    """A ``[providers.<id>]`` table of type ``scripted``."""
    return (
        f'[providers.{provider_id}]\ntype = "scripted"\ntext = "{text}"\nchunk_size = {chunk_size}\n'
        f"first_chunk_delay_ms = {first_ms}\nchunk_delay_ms = {pace_ms}\n"
    )


def add_common_arguments(parser: Any) -> None:
    """``--write FILE``: replace this benchmark's section of that file."""
    parser.add_argument("--write", type=Path, help="replace this benchmark's section of the file (BENCHMARKS.md)")


def flags(options: dict[str, Any]) -> str:
    """``{"coalesce_ms": 2.0}`` as ``--coalesce-ms 2``."""
    return " ".join(
        f"--{key.replace('_', '-')} {f'{value:g}' if isinstance(value, float) else value}"
        for key, value in options.items()
    )


def bench_main(
    name: str,
    doc: str | None,
    heading_prefix: str,
    run: Callable[..., dict[str, Any]],
    report: Callable[[dict[str, Any], str, tuple[float, float]], str],
    **defaults: float,
) -> None:
    """A benchmark's entry point (``python -m bench.<name>``): an option for each of ``defaults``
    (``coalesce_ms=2.0`` is ``--coalesce-ms``, of the default's type) and ``--write``; then
    ``run(**options)`` between two samples of ``cpu_busy()``, and the section ``report`` makes of
    the figures printed (and written, see ``write_section``)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, default in defaults.items():
        parser.add_argument("--" + key.replace("_", "-"), type=type(default), default=default)
    add_common_arguments(parser)
    args = parser.parse_args()
    options = {key: getattr(args, key) for key in defaults}
    busy_before = cpu_busy()
    figures = run(**options)
    command = f"python -m bench.{name} {flags(options)}"
    write_section(args.write, heading_prefix, report(figures, command, (busy_before, cpu_busy())))
