"""Cascade run locally for the system tests: a ``RedisServer`` and Celery workers started as the
demo starts them (``worker.demo.local.start_worker``), each stopped by its pid."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.redis_server import RedisServer
from worker.demo.local import start_worker, stop_process

REPO = Path(__file__).resolve().parents[2]


@dataclass
class LocalStack:
    """A running Redis and its workers; ``workers`` and ``logs`` are keyed by the queues a worker
    consumes (``"chat"``, ``"chat.gpu"``...)."""

    redis: RedisServer
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
    extra_env: Mapping[str, str] | None = None,
    env_of: Mapping[str, Mapping[str, str]] | None = None,
    concurrency_of: Mapping[str, int] | None = None,
) -> Iterator[LocalStack]:
    """Write ``config_text`` to ``workdir/cascade.toml``, start a ``RedisServer`` and one worker
    for each entry of ``queues`` (logging to ``workdir/worker-<queues>.log``, with ``extra_env``
    and that queue's ``env_of`` entry, ``concurrency_of`` pool processes: 1 unless given); stop
    the workers, then Redis, on the way out."""
    config = workdir / "cascade.toml"
    config.write_text(config_text)
    stack = LocalStack(RedisServer(workdir, password=redis_password).start())
    try:
        for queue in queues:
            env = {**(extra_env or {}), **(env_of or {}).get(queue, {})}
            concurrency = (concurrency_of or {}).get(queue, 1)
            stack.logs[queue] = workdir / f"worker-{queue}.log"
            with stack.logs[queue].open("wb") as log:
                stack.workers[queue] = start_worker(
                    stack.url, config, queues=queue, concurrency=concurrency, log=log, cwd=REPO, extra_env=env
                )
        yield stack
    finally:
        for process in stack.workers.values():
            stop_process(process)
        stack.redis.stop()
