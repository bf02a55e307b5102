"""A clock that moves only when a test moves it, and a timer on it with no thread of its own
(``providers.timer.Timer``): tests of anything scheduled run what is due themselves."""

from __future__ import annotations

from providers.timer import Timer


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, start: float = 100.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def threadless_timer(clock: FakeClock) -> Timer:
    """A timer on ``clock`` with no thread: a test runs what is due with ``Timer.run_due``."""
    return Timer(clock=clock, threaded=False)
