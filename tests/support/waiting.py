"""Bounded polling for the test harnesses."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], *, timeout_s: float, interval_s: float = 0.05, what: str = "condition") -> T:
    """Poll ``predicate`` every ``interval_s`` until it returns something truthy (and return that);
    raise ``TimeoutError`` after ``timeout_s``."""
    give_up = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= give_up:
            raise TimeoutError(f"{what}: not reached within {timeout_s} s")
        time.sleep(interval_s)
