"""Process harness of the fault suite: real ``redis-server`` processes and real Celery workers on
loopback, faults injected by pid (SIGKILL of a worker's process group or of one pool child,
SIGTERM, Redis restarts, ``CLIENT KILL``), and the checks every fault case shares.

Redis is ``tests.support.redis_server.RedisServer`` (password always on), workers are started with
``worker.demo.local.start_worker``. Every wait is bounded; every process is stopped by its pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from tasks.contract import keys
from tasks.contract.schemas import StreamEvent
from tasks.producer.client import CascadeClient
from tests.support.config import write_config as write_config
from tests.support.stored import dead_letters as dead_letters
from tests.support.stored import everything_produced
from tests.support.stored import stored_events as stored_events
from tests.support.stored import stored_reply as stored_reply
from tests.support.stream_contract import assert_coherent as assert_coherent
from tests.support.waiting import wait_until as wait_until
from tests.support.worker_process import WorkerProcess
from worker.demo.local import start_worker, stop_process

REPO = Path(__file__).resolve().parents[2]

# Secrets every fault case runs with; nothing any case produces may contain them.
REDIS_PASSWORD = "faults-LEAKCHECK-redis-9b1f2c"
PROVIDER_SECRETS = {
    "OPENAI_API_KEY": "sk-faults-LEAKCHECK-openai-5d2e8a",
    "AZURE_OPENAI_API_KEY": "az-faults-LEAKCHECK-azure-71c04e",
    "HF_API_TOKEN": "hf_faultsLEAKCHECKtoken3e9d",
}
ALL_SECRETS = {"redis password": REDIS_PASSWORD, **PROVIDER_SECRETS}

# Short leases, so a dead worker's request is sent again within seconds (defaults: 10 s and 2 s).
FAST_RECOVERY_ENV = {"CASCADE_LEASE_TTL_S": "2", "CASCADE_REAPER_INTERVAL_S": "0.5"}

# The bound: a request whose worker died is running again and answered within this.
RECOVERY_BOUND_S = 30.0
WORKER_START_TIMEOUT_S = 45.0
REQUEST_TIMEOUT_S = 30.0

# Every worker started in this session: a failing test shows their logs, teardown kills leftovers.
STARTED: list[FaultWorker] = []


def new_id(prefix: str = "f") -> str:
    """A fresh request id."""
    return f"{prefix}-{uuid.uuid4().hex}"


# --- processes -----------------------------------------------------------------------------------


def pool_children(pid: int) -> list[int]:
    """The pids of the direct children of ``pid`` (a worker's prefork pool). A replacement child
    may be forked by any thread of the worker, so every thread's list is read."""
    children: set[int] = set()
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                children.update(int(child) for child in (task / "children").read_text().split())
            except (FileNotFoundError, ProcessLookupError):
                continue
        return sorted(children)
    except (FileNotFoundError, ProcessLookupError):
        return []
    except PermissionError:  # pragma: no cover - /proc without the children files
        pass
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.add(int(stat.parent.name))
    return sorted(children)


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (``VmRSS`` in ``/proc``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ProcessLookupError(pid)


def pid_of(worker_name: str | None) -> int | None:
    """The pool child's pid in a worker name ``host/pid`` (events and replies carry it)."""
    if not worker_name or "/" not in worker_name:
        return None
    tail = worker_name.rsplit("/", 1)[1]
    return int(tail) if tail.isdigit() else None


@dataclass
class FaultWorker(WorkerProcess):
    """One ``celery -A worker worker -Q chat -c N`` started by ``worker.demo.local.start_worker``, in
    its own process group, logging to ``log_path`` (appended across restarts)."""

    name: str
    redis_url: str
    config: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    concurrency: int = 1
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    _offset: int = 0

    def start(self, timeout_s: float = WORKER_START_TIMEOUT_S) -> FaultWorker:
        """Start the worker and wait until it logged ``ready`` and forked its pool."""
        self.launch()
        return self.wait_ready(timeout_s)

    def launch(self) -> FaultWorker:
        """Start the worker process without waiting for it (see ``wait_ready``)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        env = {**PROVIDER_SECRETS, "PYTHONUNBUFFERED": "1", **self.env}
        with self.log_path.open("ab") as log:
            self.proc = start_worker(
                self.redis_url, self.config, concurrency=self.concurrency, log=log, extra_env=env, cwd=REPO
            )
        if self not in STARTED:
            STARTED.append(self)
        self.starts += 1
        return self

    def wait_ready(self, timeout_s: float = WORKER_START_TIMEOUT_S) -> FaultWorker:
        """Wait until the worker logged ``ready`` (its consumer and reaper run) and forked its pool."""

        def ready() -> bool:
            self.assert_alive()
            with self.log_path.open("rb") as log:
                log.seek(self._offset)
                started = b" ready." in log.read()
            return started and len(self.pool_pids()) >= self.concurrency

        try:
            wait_until(ready, timeout_s=timeout_s, what=f"worker {self.name} ready")
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def pool_pids(self) -> list[int]:
        return pool_children(self.pid) if self.alive() else []

    def runs(self, worker_name: str | None) -> bool:
        """True if ``worker_name`` (``host/pid``) is one of this worker's pool processes."""
        pid = pid_of(worker_name)
        return pid is not None and pid in self.pool_pids()

    def kill_group(self) -> None:
        """SIGKILL the whole process group: the main process and its pool, no goodbye."""
        os.killpg(self.pid, signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(timeout=10)

    def kill_child(self, pid: int) -> None:
        """SIGKILL one pool process; the main process lives on and forks a new one."""
        assert pid in self.pool_pids(), f"{pid} is not a pool process of {self.name}"
        os.kill(pid, signal.SIGKILL)

    def terminate(self) -> None:
        """SIGTERM to the main process only, as a supervisor sends it (a warm shutdown)."""
        os.kill(self.pid, signal.SIGTERM)

    def wait_exit(self, timeout_s: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace_s=10)
            if self.proc.poll() is None:  # pragma: no cover - stop_process waits
                self.proc.kill()
        # A pool child orphaned by a killed main process keeps the group id: collect it too.
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, AssertionError):
            pass


@contextmanager
def running_worker(
    workdir: Path,
    redis_url: str,
    providers: Mapping[str, Mapping[str, Any]],
    chains: Mapping[str, Iterable[str]],
    *,
    name: str,
    env: dict[str, str] | None = None,
) -> Iterator[FaultWorker]:
    """One ``FaultWorker`` named ``name`` serving ``providers`` and ``chains`` (its config and log
    in ``workdir``), started and ready; stopped on the way out."""
    config = write_config(workdir / "cascade.toml", providers, chains)
    worker = FaultWorker(name, redis_url, config, workdir / f"worker-{name}.log", env=dict(env or {}))
    try:
        yield worker.start()
    finally:
        worker.stop()


# --- following a request ------------------------------------------------------------------------


class Follower:
    """A subscriber following one request's stream from seq 0 in a thread, as a client would."""

    def __init__(self, redis_url: str, request_id: str, timeout_s: float = 60.0) -> None:
        self.request_id = request_id
        self.events: list[StreamEvent] = []
        self.error: BaseException | None = None
        self._client = CascadeClient(redis_url)
        self._thread = threading.Thread(target=self._follow, args=(timeout_s,), daemon=True)
        self._thread.start()

    def _follow(self, timeout_s: float) -> None:
        try:
            for event in self._client.events(self.request_id, timeout_s=timeout_s):
                self.events.append(event)
        except BaseException as exc:  # reported by result()
            self.error = exc

    def result(self, timeout_s: float = 60.0) -> list[StreamEvent]:
        self._thread.join(timeout=timeout_s)
        self._client.close()
        assert not self._thread.is_alive(), f"the subscriber of {self.request_id} is still waiting"
        if self.error is not None:
            raise self.error
        return self.events


# --- secrets -------------------------------------------------------------------------------------


def assert_no_secrets(client: redis.Redis, logs: Iterable[Path]) -> None:
    """None of the suite's secrets appears in anything the fault case produced."""
    everything = everything_produced(client, logs)
    assert everything, "nothing produced: the scan would prove nothing"
    leaked = [name for name, secret in ALL_SECRETS.items() if secret in everything]
    assert not leaked, f"leaked: {leaked}"


# --- counting reply writes -----------------------------------------------------------------------


class ReplyWrites:
    """Counts every write of every ``cascade:reply:*`` key through keyspace notifications
    (``notify-keyspace-events K$``), so a reply overwritten by a second run would show as two.
    After a Redis restart, ``resubscribe()`` turns notifications on again and listens anew
    (writes in between are not seen)."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        db = client.connection_pool.connection_kwargs.get("db", 0)
        self._prefix = f"__keyspace@{db}__:"
        self.writes: dict[str, list[str]] = {}
        self.resubscribed = 0
        self._pubsub = self._subscribe()

    def _subscribe(self) -> Any:
        self._client.config_set("notify-keyspace-events", "K$")
        pubsub = self._client.pubsub()
        pubsub.psubscribe(f"{self._prefix}{keys.reply_key('*')}")
        give_up = time.monotonic() + 5
        while time.monotonic() < give_up:
            message = pubsub.get_message(timeout=0.1)
            if message is not None and message["type"] == "psubscribe":
                return pubsub
        raise TimeoutError("no confirmation of the keyspace subscription")

    def resubscribe(self) -> None:
        """Listen again on a new connection (after Redis restarted)."""
        try:
            self.drain(settle_s=0.0)
        except redis.ConnectionError:
            pass
        self._pubsub.close()
        self._pubsub = self._subscribe()
        self.resubscribed += 1

    def drain(self, settle_s: float = 0.3, max_s: float = 20.0) -> dict[str, list[str]]:
        """Read the notifications that arrived; keep reading until none came for ``settle_s``."""
        quiet_until = time.monotonic() + settle_s
        give_up = time.monotonic() + max_s
        while True:
            message = self._pubsub.get_message(timeout=0.05)
            if message and message["type"] == "pmessage":
                key = message["channel"].decode()[len(self._prefix) :]
                self.writes.setdefault(key, []).append(message["data"].decode())
                quiet_until = time.monotonic() + settle_s
            elif message is None and time.monotonic() >= min(quiet_until, give_up):
                return self.writes

    def sets_of(self, request_id: str) -> list[str]:
        self.drain()
        return [op for op in self.writes.get(keys.reply_key(request_id), []) if op == "set"]

    def close(self) -> None:
        self._pubsub.close()
