"""Timestamps inside a worker, for ``bench.tail``: where the slowest requests spend their time.

Installed by the probe apps (``bench.tail_apps``) in every process of a worker:

- each process (the main one and the pool's) records its garbage collections (``gc.callbacks``:
  generation, start, stop);
- the main process records when its consumer received each task message (``task_received``);
- a pool process records when each task starts and ends (``task_prerun`` / ``task_postrun``) and,
  where Cascade runs, the opening script's round trip (``lua.Script.call`` of ``open``) and the
  first chunk: when the provider handed it over and when its write returned
  (``RequestRunner.on_chunk``); in the Haystack task, the streaming callback (its publish).

Everything is kept in memory and written as one JSON line per task (pool) or per message
(main) to ``$BENCH_TAIL_DIR/<pid>.jsonl`` after the task ended, off the timed path. Times are
``time.time()``, so they line up with the benchmark's own clock on the same machine.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

_lock = threading.Lock()
_gcs: list[tuple[int, float, float]] = []  # (kind, start, stop) since the last write: a generation, or below
REAPER, TIMER = 10, 11  # a reaper pass (main process), a timer run with a callback (pool process)
_gc_started: dict[str, float] = {}
_current: dict[str, Any] = {}  # the task this pool process runs
_installed = {"done": False}


def _out() -> Path:
    return Path(os.environ["BENCH_TAIL_DIR"]) / f"{os.getpid()}.jsonl"


def _write(record: dict[str, Any]) -> None:
    with _out().open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    now = time.time()
    if phase == "start":
        _gc_started["at"] = now
    else:
        _gcs.append((int(info.get("generation", -1)), _gc_started.pop("at", now), now))


def _take_gcs(since: float) -> list[tuple[int, float, float]]:
    with _lock:
        taken = [entry for entry in _gcs if entry[2] >= since]
        _gcs.clear()
    return taken


def stamp(name: str) -> None:
    """Record ``name`` for the running task (the first time only)."""
    _current.setdefault(name, time.time())


def _task_prerun(task_id: str | None = None, **_: Any) -> None:
    _current.clear()
    _current["task_id"] = task_id
    _current["prerun"] = time.time()
    _current["pid"] = os.getpid()


def _task_postrun(**_: Any) -> None:
    record = dict(_current)
    record["postrun"] = time.time()
    record["gcs"] = _take_gcs(record.get("prerun", 0.0) - 1.0)
    record["gc_frozen"] = gc.get_freeze_count()
    _write(record)


def _task_received(request: Any = None, **_: Any) -> None:
    record = {"task_id": getattr(request, "id", None), "received": time.time(), "pid": os.getpid(), "main": True}
    record["gcs"] = _take_gcs(record["received"] - 1.0)
    _write(record)


def _timed(kind: int, function: Any) -> Any:
    """``function``, recording each call's start and stop as a ``kind`` event."""

    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.time()
        try:
            return function(*args, **kwargs)
        finally:
            with _lock:
                _gcs.append((kind, started, time.time()))

    return timed


def _probe_screen() -> None:
    """Stamp the transport's screen of each message (main process): in, out, by task id."""
    from worker.boundary.transport import Channel

    real_admit = Channel._admit

    @functools.wraps(real_admit)
    def admit(self: Channel, *args: Any, **kwargs: Any) -> Any:
        started = time.time()
        message = real_admit(self, *args, **kwargs)
        task_id = ((message or {}).get("headers") or {}).get("id")
        _write({"task_id": task_id, "admit_in": started, "admit_out": time.time(), "pid": os.getpid(), "main": True})
        return message

    Channel._admit = admit  # type: ignore[method-assign]


def _probe_background() -> None:
    """Record the reaper's passes (each of its three sweeps) and the timer's callbacks."""
    from providers.timer import Timer
    from worker.state import reaper

    for name in ("reclaim_expired", "restore_orphans", "resend_lost", "lead_sweep"):
        setattr(reaper, name, _timed(REAPER, getattr(reaper, name)))
    real_pop = Timer._pop_ready

    def pop_ready(self: Timer, now: float) -> Any:
        ready = real_pop(self, now)
        if ready is not None:
            key, callback = ready
            return key, _timed(TIMER, callback)
        return ready

    Timer._pop_ready = pop_ready  # type: ignore[method-assign]


def _probe_cascade() -> None:
    """Wrap the opening script and the runner's chunk callback (Cascade's pool process)."""
    from tasks.runner import RequestRunner
    from worker.state import lua

    real_call = lua.Script.call

    @functools.wraps(real_call)
    def call(self: lua.Script, *args: Any, **kwargs: Any) -> Any:
        if self.name != "open":
            return real_call(self, *args, **kwargs)
        stamp("open_start")
        try:
            return real_call(self, *args, **kwargs)
        finally:
            stamp("open_end")

    lua.Script.call = call  # type: ignore[method-assign]
    real_on_chunk = RequestRunner.on_chunk

    @functools.wraps(real_on_chunk)
    def on_chunk(self: RequestRunner, *args: Any, **kwargs: Any) -> None:
        stamp("chunk_in")
        try:
            real_on_chunk(self, *args, **kwargs)
        finally:
            stamp("chunk_out")

    RequestRunner.on_chunk = on_chunk  # type: ignore[method-assign]


def _probe_deliver() -> None:
    """Stamp kombu handing each message to Celery's consumer (main process), in either worker."""
    from kombu.transport import virtual

    real_deliver = virtual.Transport._deliver

    @functools.wraps(real_deliver)
    def deliver(self: Any, message: Any, queue: str) -> Any:
        task_id = ((message or {}).get("headers") or {}).get("id") if isinstance(message, dict) else None
        _write({"task_id": task_id, "deliver": time.time(), "pid": os.getpid(), "main": True})
        return real_deliver(self, message, queue)

    virtual.Transport._deliver = deliver  # type: ignore[method-assign]


def install(*, cascade: bool) -> None:
    """Connect the probes in this process and the processes it forks (once)."""
    from celery.signals import task_postrun, task_prerun, task_received

    if _installed["done"]:
        return
    _installed["done"] = True
    gc.callbacks.append(_on_gc)
    task_prerun.connect(_task_prerun, weak=False)
    task_postrun.connect(_task_postrun, weak=False)
    task_received.connect(_task_received, weak=False)
    _probe_deliver()
    if cascade:
        _probe_cascade()
        _probe_background()
        _probe_screen()


def probe_haystack() -> None:
    """Stamp the Haystack task's first chunk: its first ``publish`` of a chunk, in and out."""
    import bench.haystack_baseline as baseline

    real_redis = baseline._redis

    class Stamped:
        def __init__(self, client: Any) -> None:
            self._client = client

        def publish(self, channel: str, data: str) -> Any:
            chunk = '"chunk"' in data
            if chunk:
                stamp("chunk_in")
            try:
                return self._client.publish(channel, data)
            finally:
                if chunk:
                    stamp("chunk_out")

    baseline._redis = functools.cache(lambda: Stamped(real_redis()))  # type: ignore[assignment]
