"""One timer thread per process: callbacks run at their due time, keyed so they can be moved
or cancelled.

The call guard's watchdog (``providers.guard``), the lease heartbeat (``worker.state.lease``)
and the publisher's coalescing flush (``worker.state.publisher``) all need "run this at that
moment" for every request a process runs at once. ``TIMER`` serves them all with one daemon
thread, started by the first ``schedule``; scheduling starts no thread of its own, which on a
busy machine can take milliseconds on the path of a request's first token.

- ``schedule(key, due, callback)`` runs ``callback`` once ``clock()`` reaches ``due``; a key
  holds one entry, so scheduling it again moves it. A callback may schedule its own key again
  (a heartbeat's next beat).
- ``cancel(key)`` drops the key's entry; once it returns, no callback of that key is running
  (it waits for one in flight, and only for that one) and none will: a callback in flight
  that schedules its own key again after the cancel is not scheduled. Called from the
  callback itself it does not wait.
- Callbacks run one at a time on the timer's thread, outside its lock: a slow callback never
  holds up a thread scheduling or cancelling another key. They must be short (a Redis round
  trip, closing a stream): every other key waits for them. An exception is logged and the
  timer goes on.
- Fork-safe: a forked child (a prefork pool process) starts with no entries and no thread
  (``os.register_at_fork``); the parent's thread is not there.

Tests build a ``Timer(clock=..., threaded=False)`` and drive it with ``run_due``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
Callback = Callable[[], None]


class Timer:
    """A set of keyed callbacks run at their due time (see the module docstring)."""

    def __init__(self, clock: Clock = time.monotonic, *, threaded: bool = True, name: str = "cascade-timer") -> None:
        self.clock = clock
        self._threaded = threaded
        self._name = name
        self._reset()

    def _reset(self) -> None:
        """A fresh state: at creation, and in a forked child."""
        self._cond = threading.Condition()
        self._entries: dict[Hashable, tuple[float, int, Callback]] = {}
        # Ordered by due time; an entry moved or cancelled leaves a stale row, skipped when met.
        self._heap: list[tuple[float, int, Hashable]] = []
        self._order = itertools.count()
        self._running: Hashable | None = None  # the key whose callback is in flight
        self._runner: int | None = None  # the thread running it
        self._running_cancelled = False  # the key in flight was cancelled: it stays so
        self._thread: threading.Thread | None = None

    def schedule(self, key: Hashable, due: float, callback: Callback) -> None:
        """Run ``callback`` at ``due`` (on ``clock``), replacing what ``key`` had scheduled."""
        with self._cond:
            if self._running_cancelled and self._running == key:
                return
            earliest = self._earliest()
            order = next(self._order)
            self._entries[key] = (due, order, callback)
            heapq.heappush(self._heap, (due, order, key))
            if not self._threaded:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            elif earliest is None or due < earliest:
                # Only when the thread must wake sooner than it planned: a wake costs a thread
                # switch on the caller's path.
                self._cond.notify_all()

    def cancel(self, key: Hashable) -> None:
        """Drop ``key``'s entry; once this returns its callback is not running (unless this is
        called from that callback)."""
        with self._cond:
            self._entries.pop(key, None)
            if self._running is not None and self._running == key:
                self._running_cancelled = True
            while self._running is not None and self._running == key and self._runner != threading.get_ident():
                self._cond.wait()

    def due(self, key: Hashable) -> float | None:
        """When ``key`` is due, or None if it is not scheduled."""
        with self._cond:
            entry = self._entries.get(key)
            return entry[0] if entry is not None else None

    def run_due(self) -> float | None:
        """Run every callback due by now, one at a time; return when the next is due (None if
        none is). The thread's loop, and a test's way to drive a timer with no thread."""
        while True:
            with self._cond:
                ready = self._pop_ready(self.clock())
                if ready is None:
                    return self._earliest()
                key, callback = ready
                self._running, self._runner = key, threading.get_ident()
            try:
                callback()
            except Exception:  # a bug in one callback must not stop every other key's
                logger.exception("timer callback for %r failed", key)
            finally:
                with self._cond:
                    self._running = self._runner = None
                    self._running_cancelled = False
                    self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            self.run_due()
            with self._cond:
                earliest, now = self._earliest(), self.clock()
                if earliest is not None and earliest <= now:
                    continue  # came due while the last callback ran
                self._cond.wait(None if earliest is None else earliest - now)

    def _earliest(self) -> float | None:
        """The due time of the first live entry (lock held)."""
        heap = self._heap
        while heap:
            due, order, key = heap[0]
            entry = self._entries.get(key)
            if entry is not None and entry[1] == order:
                return due
            heapq.heappop(heap)
        return None

    def _pop_ready(self, now: float) -> tuple[Hashable, Callback] | None:
        """Take the first live entry due by ``now`` off the timer (lock held)."""
        earliest = self._earliest()
        if earliest is None or earliest > now:
            return None
        _due, _order, key = heapq.heappop(self._heap)
        _due, _order, callback = self._entries.pop(key)
        return key, callback


TIMER = Timer()
"""The process's timer."""
os.register_at_fork(after_in_child=TIMER._reset)
