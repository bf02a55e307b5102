"""Wall-clock limits for a provider call that blocks on the network.

An HTTP client's read timeout bounds one read, not a whole streamed answer, and a cancel or a
deadline cannot interrupt a blocking read. ``CallGuard`` has a watchdog thread close the
call's stream when its time is up — the provider's ``first_chunk_timeout_s`` until the
first chunk, its ``timeout_s`` for the whole call, and the request's deadline — so the blocked
read fails at once; the provider then asks ``guard.failure()`` which limit fired and raises
that instead of the read error the close caused.

One watchdog thread per process serves every open guard: a call starts no thread of its own,
which on a busy machine can take milliseconds on the path of the first token.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from types import TracebackType

from providers import errors
from providers.base import ProviderCall
from settings.providers import ProviderConfigBase


class _Watchdog:
    """The process's watchdog thread: fires the limit of every open guard when it passes."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        """A fresh state: at import, and in a forked child (the parent's thread is not there)."""
        self.lock = threading.Condition()
        self._guards: set[CallGuard] = set()
        self._thread: threading.Thread | None = None

    def watch(self, guard: CallGuard) -> None:
        """Start watching ``guard``."""
        with self.lock:
            self._guards.add(guard)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="cascade-guard", daemon=True)
                self._thread.start()
            else:
                self.lock.notify()

    def forget(self, guard: CallGuard) -> None:
        """Stop watching ``guard`` (its limit can no longer fire)."""
        with self.lock:
            self._guards.discard(guard)

    def _run(self) -> None:
        while True:
            with self.lock:
                now = time.monotonic()
                fired: list[tuple[CallGuard, Callable[[], None] | None]] = []
                next_limit: float | None = None
                for guard in list(self._guards):
                    limit, error = guard._next_limit()
                    if limit <= now:
                        guard._fired = error
                        fired.append((guard, guard._closer))
                        self._guards.discard(guard)
                    elif next_limit is None or limit < next_limit:
                        next_limit = limit
                if not fired:
                    self.lock.wait(None if next_limit is None else next_limit - now)
                    continue
            for guard, closer in fired:  # outside the lock: closing a stream may block a while
                guard._close(closer)


_WATCHDOG = _Watchdog()


class CallGuard:
    """Use as a context manager around one provider call; see the module docstring."""

    def __init__(self, call: ProviderCall, config: ProviderConfigBase, provider_id: str) -> None:
        self._started = time.monotonic()
        self._request_deadline = call.deadline
        self._call_deadline = min(self._started + config.timeout_s, call.deadline)
        first = config.first_chunk_timeout_s
        self._first_chunk_deadline = self._started + first if first is not None else None
        self._provider_id = provider_id
        self._closer: Callable[[], None] | None = None
        self._got_chunk = False
        self._fired: errors.CascadeError | None = None
        self._closed = threading.Event()  # set once the watchdog is done closing a fired call

    def __enter__(self) -> CallGuard:
        _WATCHDOG.watch(self)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        _WATCHDOG.forget(self)
        with _WATCHDOG.lock:
            fired = self._fired is not None
        if fired:
            self._closed.wait()  # never return while the watchdog is still closing this call

    @property
    def first_read_timeout_s(self) -> float:
        """A read timeout for the HTTP client: never longer than the time left to the first chunk."""
        limit = self._first_chunk_deadline or self._call_deadline
        return max(0.001, min(limit, self._call_deadline) - time.monotonic())

    def attach(self, closer: Callable[[], None]) -> None:
        """Register how to abort the call (e.g. ``stream.close``); runs at once if time is up."""
        with _WATCHDOG.lock:
            self._closer = closer
            fired = self._fired is not None
        if fired:
            closer()

    def chunk_received(self) -> None:
        """Mark the first chunk: from now on only the whole-call limit applies."""
        if not self._got_chunk:
            with _WATCHDOG.lock:
                self._got_chunk = True  # the watchdog's next look sees the later limit
        self.raise_if_fired()

    def failure(self) -> errors.CascadeError | None:
        """The timeout (or deadline) that fired, if any."""
        return self._fired

    def raise_if_fired(self) -> None:
        """Raise the limit that fired, if one did."""
        if self._fired is not None:
            raise self._fired

    def _next_limit(self) -> tuple[float, errors.CascadeError]:
        error: errors.CascadeError
        if self._call_deadline >= self._request_deadline:
            limit, error = self._request_deadline, errors.DeadlineExceeded("the request's deadline passed")
        else:
            limit = self._call_deadline
            error = errors.ProviderTimeout(f"{self._provider_id}: no complete answer within its timeout_s")
        if not self._got_chunk and self._first_chunk_deadline is not None and self._first_chunk_deadline < limit:
            return self._first_chunk_deadline, errors.ProviderTimeout(
                f"{self._provider_id}: no first chunk within its first_chunk_timeout_s"
            )
        return limit, error

    def _close(self, closer: Callable[[], None] | None) -> None:
        """The watchdog's part once the limit fired: abort the call."""
        try:
            if closer is not None:
                closer()
        except Exception:  # noqa: BLE001, S110 - closing a stream the reader is still using may fail; the reader sees it
            pass
        finally:
            self._closed.set()
