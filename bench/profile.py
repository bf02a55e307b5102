"""Where a Cascade pool process spends its time: py-spy on a worker under load.

Starts a worker (one pool process), queues a batch of requests of a zero-delay ``scripted``
chain (20 chunks each), and records its pool process with ``py-spy record --format raw``
(``pip install py-spy``; it needs ptrace rights). Prints, for the frames that matter, the share
of the main thread's samples whose stack holds them (inclusive), and the busiest leaf frames.
``--idle`` counts waiting too (wall time).

    python -m bench.profile [--requests 300] [--first-ms 0] [--coalesce-ms 0] [--idle]
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import time
from pathlib import Path

from bench.common import PROMPT, TEXT, Stack, scripted_toml
from bench.throughput import run_batch
from tasks.contract.schemas import TASK_NAME

# Frames worth naming (function, file), in the order printed.
WATCHED = [
    ("chat", "chat.py"),
    ("read_request", "intake.py"),
    ("open_run", "opening.py"),
    ("ChainWalk.execute", "chain.py"),
    ("EventPublisher._send", "publisher.py"),
    ("EventPublisher._finish", "publisher.py"),
    ("Backend.store_result", "base.py"),
    ("Pipeline.execute", "client.py"),
    ("Redis.execute_command", "client.py"),
    ("Thread.start", "threading.py"),
]


def _frame(raw: str) -> tuple[str, str]:
    """``name (path:line)`` -> (name, file name)."""
    name, _, where = raw.partition(" (")
    return name, Path(where.split(":")[0]).name


def summarise(path: Path, top: int = 12) -> str:
    """Inclusive shares of the watched frames and the busiest leaves, from a raw py-spy file."""
    inclusive: collections.Counter[tuple[str, str]] = collections.Counter()
    leaves: collections.Counter[tuple[str, str]] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_frame(raw) for raw in stack.split(";")]
        if ("Worker.workloop", "pool.py") not in frames:
            continue  # another thread (heartbeat, flusher, watchdog): not the request's path
        total += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
        leaves[frames[-1]] += int(count)
    if not total:
        return "no samples"
    lines = [f"{total} samples of the pool process's main thread; share of samples whose stack holds the frame:"]
    lines += [f"  {inclusive[w] / total:6.1%}  {w[0]} ({w[1]})" for w in WATCHED]
    lines.append("busiest leaf frames (self time):")
    lines += [f"  {n / total:6.1%}  {f[0]} ({f[1]})" for f, n in leaves.most_common(top)]
    return "\n".join(lines)


def run(requests: int, first_ms: float, coalesce_ms: float, idle: bool) -> str:
    """Profile one pool process over ``requests`` back-to-back requests; return the summary."""
    spy = shutil.which("py-spy")
    if spy is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    import redis

    with Stack("profile") as stack:
        config = stack.config(
            scripted_toml("steady", text=TEXT, chunk_size=4, first_ms=first_ms, pace_ms=0)
            + '[chains]\ndefault = ["steady"]\n'
        )
        worker = stack.cascade_worker(config, env={"CASCADE_COALESCE_MS": str(coalesce_ms)})
        client = redis.Redis.from_url(stack.url)

        def kwargs_of(task_id: str) -> dict[str, object]:
            return {"request": {"request_id": task_id, "prompt": PROMPT, "chain": "default"}}

        run_batch(client, TASK_NAME, "chat", kwargs_of, 20)  # warm-up: the pool process exists now
        child = Path(f"/proc/{worker.pid}/task/{worker.pid}/children").read_text().split()[0]
        out = stack.workdir / "profile.txt"
        args = [spy, "record", "-r", "1000", "-p", child, "-o", str(out), "-f", "raw", "--nonblocking"]
        recorder = subprocess.Popen([*args, *(["--idle"] if idle else [])], stdout=subprocess.DEVNULL)
        time.sleep(1.0)  # py-spy attaches
        run_batch(client, TASK_NAME, "chat", kwargs_of, requests)  # queued at once: the process never idles
        recorder.send_signal(2)
        recorder.wait(timeout=60)
        client.close()
        return summarise(out)


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--first-ms", type=float, default=0.0)
    parser.add_argument("--coalesce-ms", type=float, default=0.0)
    parser.add_argument("--idle", action="store_true", help="count waiting (wall time), not just CPU")
    args = parser.parse_args()
    print(run(args.requests, args.first_ms, args.coalesce_ms, args.idle))


if __name__ == "__main__":
    main()
