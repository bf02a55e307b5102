"""Wall-clock limits for a provider call that blocks on the network.

An HTTP client's read timeout bounds one read, not a whole streamed answer, and a cancel or a
deadline cannot interrupt a blocking read. ``CallGuard`` runs a watchdog thread that closes
the call's stream when its time is up — the provider's ``first_chunk_timeout_s`` until the
first chunk, its ``timeout_s`` for the whole call, and the request's deadline — so the blocked
read fails at once; the provider then asks ``guard.failure()`` which limit fired and raises
that instead of the read error the close caused.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import TracebackType

from providers import errors
from providers.base import ProviderCall
from settings.providers import ProviderConfigBase


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
        self._changed = threading.Condition()
        self._done = False
        self._thread = threading.Thread(target=self._watch, name=f"guard-{provider_id}", daemon=True)

    def __enter__(self) -> CallGuard:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with self._changed:
            self._done = True
            self._changed.notify_all()
        self._thread.join()

    @property
    def first_read_timeout_s(self) -> float:
        """A read timeout for the HTTP client: never longer than the time left to the first chunk."""
        limit = self._first_chunk_deadline or self._call_deadline
        return max(0.001, min(limit, self._call_deadline) - time.monotonic())

    def attach(self, closer: Callable[[], None]) -> None:
        """Register how to abort the call (e.g. ``stream.close``); runs at once if time is up."""
        with self._changed:
            self._closer = closer
            fired = self._fired is not None
        if fired:
            closer()

    def chunk_received(self) -> None:
        """Mark the first chunk: from now on only the whole-call limit applies."""
        if not self._got_chunk:
            with self._changed:
                self._got_chunk = True
                self._changed.notify_all()
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

    def _watch(self) -> None:
        with self._changed:
            while not self._done:
                limit, error = self._next_limit()
                remaining = limit - time.monotonic()
                if remaining <= 0:
                    self._fired = error
                    closer = self._closer
                    break
                self._changed.wait(remaining)
            else:
                return
        if closer is not None:
            try:
                closer()
            except Exception:  # noqa: BLE001, S110 - closing a stream the reader is still using may fail; the reader sees it
                pass
