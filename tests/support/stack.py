"""Cascade run locally for the system tests: ``worker.demo.local``'s redis-server and Celery workers,
started as the demo starts them, each stopped by its pid."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from worker.demo.local import LocalRedis, start_worker, stop_process

REPO = Path(__file__).resolve().parents[2]


@dataclass
class LocalStack:
    """A running Redis and its workers; ``workers`` and ``logs`` are keyed by the queues a worker
    consumes (``"chat"``, ``"chat.gpu"``...)."""

    redis: LocalRedis
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The Redis URL of producers and workers (password included)."""
        return self.redis.url


@contextmanager
def local_stack(
    workdir: Path,
    config_text: str,
    queues: Sequence[str] = ("chat",),
    *,
    redis_password: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> Iterator[LocalStack]:
    """Write ``config_text`` to ``workdir/cascade.toml``, start a ``LocalRedis`` and one worker for
    each entry of ``queues`` (logging to ``workdir/worker-<queues>.log``, with ``extra_env``);
    stop the workers, then Redis, on the way out."""
    config = workdir / "cascade.toml"
    config.write_text(config_text)
    stack = LocalStack(LocalRedis(workdir, password=redis_password).start())
    try:
        for queue in queues:
            stack.logs[queue] = workdir / f"worker-{queue}.log"
            with stack.logs[queue].open("wb") as log:
                stack.workers[queue] = start_worker(
                    stack.url, config, queues=queue, log=log, cwd=REPO, extra_env=extra_env
                )
        yield stack
    finally:
        for process in stack.workers.values():
            stop_process(process)
        stack.redis.stop()
