"""The coalescing of ``worker.state.publisher``: a request's waiting chunk, and the one thread per
process that publishes the waiting chunks of every request whose window ended."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol


class Flushable(Protocol):
    """A publisher with a chunk waiting for its window to end."""

    def flush_due(self) -> None:
        """Publish what waits, if it still should."""


@dataclass
class PendingChunk:
    """Chunk deltas of one attempt waiting for their window to end."""

    fields: dict[str, Any]
    due: float
    deltas: list[str] = field(default_factory=list)

    def merged(self) -> dict[str, Any]:
        return {**self.fields, "delta": "".join(self.deltas)}

    def same_attempt(self, fields: dict[str, Any]) -> bool:
        return all(self.fields.get(name) == fields.get(name) for name in ("provider", "attempt"))


class Flusher:
    """One daemon thread per process publishes the waiting chunks of every request whose
    window ended, so coalescing starts no thread per request."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        """A fresh state: at import, and in a forked child (the parent's thread is not there)."""
        self._cond = threading.Condition()
        self._due: dict[Flushable, float] = {}
        self._thread: threading.Thread | None = None

    def schedule(self, publisher: Flushable, due: float) -> None:
        """Have ``publisher`` flushed at ``due`` (``time.monotonic()``)."""
        with self._cond:
            wake = not self._due or due < min(self._due.values())  # else the thread wakes in time
            self._due[publisher] = min(due, self._due.get(publisher, due))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="cascade-coalesce", daemon=True)
                self._thread.start()
            elif wake:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                ready = [publisher for publisher, due in self._due.items() if due <= now]
                for publisher in ready:
                    del self._due[publisher]
                if not ready:
                    next_due = min(self._due.values(), default=None)
                    self._cond.wait(None if next_due is None else next_due - now)
                    continue
            for publisher in ready:  # outside our lock: each takes its publisher's lock
                publisher.flush_due()


FLUSHER = Flusher()
