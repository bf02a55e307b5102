"""Wall-clock limits for a provider call that blocks on the network.

An HTTP client's read timeout bounds one read, not a whole streamed answer, and a cancel or a
deadline cannot interrupt a blocking read. ``CallGuard`` has a watchdog thread close the
call's stream when its time is up — the provider's ``first_chunk_timeout_s`` until the
first chunk, its ``timeout_s`` for the whole call, and the request's deadline — so the blocked
read fails at once; the provider then asks ``guard.failure()`` which limit fired and raises
that instead of the read error the close caused.

The process's one timer thread (``providers.timer``) fires every open guard's limit: a call
starts no thread of its own, which on a busy machine can take milliseconds on the path of the
first token.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Protocol

from providers import errors
from providers.timer import TIMER
from settings.providers import ProviderConfigBase


class Deadlined(Protocol):
    """What a guard needs of the call it bounds: its request's deadline (``time.monotonic()``)."""

    @property
    def deadline(self) -> float:
        """The request's deadline."""
        ...


class CallGuard:
    """Use as a context manager around one provider call; see the module docstring."""

    def __init__(self, call: Deadlined, config: ProviderConfigBase, provider_id: str) -> None:
        self._started = time.monotonic()
        self._request_deadline = call.deadline
        self._call_deadline = min(self._started + config.timeout_s, call.deadline)
        first = config.first_chunk_timeout_s
        self._first_chunk_deadline = self._started + first if first is not None else None
        self._provider_id = provider_id
        self._closer: Callable[[], None] | None = None
        self._got_chunk = False
        self._fired: errors.CascadeError | None = None
        # Orders the first chunk against the limit firing: either the timer sees the chunk (and
        # waits for the later limit), or the reader sees the limit that fired.
        self._lock = threading.Lock()

    def __enter__(self) -> CallGuard:
        TIMER.schedule(self, self._next_limit()[0], self._expire)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Waits while the timer is closing this call: the guard never returns mid-close.
        TIMER.cancel(self)

    @property
    def first_read_timeout_s(self) -> float:
        """A read timeout for the HTTP client: never longer than the time left to the first chunk."""
        limit = self._first_chunk_deadline or self._call_deadline
        return max(0.001, min(limit, self._call_deadline) - time.monotonic())

    def attach(self, closer: Callable[[], None]) -> None:
        """Register how to abort the call (e.g. ``stream.close``); runs at once if time is up."""
        with self._lock:
            self._closer = closer
            fired = self._fired is not None
        if fired:
            closer()

    def chunk_received(self) -> None:
        """Mark the first chunk: from now on only the whole-call limit applies."""
        if not self._got_chunk:
            with self._lock:
                self._got_chunk = True  # the timer, when it fires, moves on to the later limit
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

    def _expire(self) -> None:
        """The timer's part: fire the limit that passed and abort the call, or, once the first
        chunk came, wait for the later limit."""
        with self._lock:
            if self._fired is not None:
                return
            limit, error = self._next_limit()
            if limit > time.monotonic():
                TIMER.schedule(self, limit, self._expire)
                return
            self._fired = error
            closer = self._closer
        try:
            if closer is not None:
                closer()
        except Exception:  # noqa: BLE001, S110 - closing a stream the reader is still using may fail; the reader sees it
            pass
