"""The process's one timer thread (providers/timer.py): keyed callbacks run in due order, moved,
cancelled and rescheduled from their own callback; driven by hand on a fake clock, and on its
thread where the thread is what is tested."""

from __future__ import annotations

import os
import threading

import pytest

from providers.timer import TIMER, Timer
from tests.support.clock import FakeClock, threadless_timer

# Bounds of the waits below: far longer than any step takes, so only a hang reaches them.
HANG_S = 10.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def timer(clock: FakeClock) -> Timer:
    return threadless_timer(clock)


def test_callbacks_run_once_due_in_due_order(timer: Timer, clock: FakeClock) -> None:
    ran: list[str] = []
    timer.schedule("late", 102.0, lambda: ran.append("late"))
    timer.schedule("early", 101.0, lambda: ran.append("early"))
    assert timer.run_due() == 101.0 and ran == []
    clock.now = 101.5
    assert timer.run_due() == 102.0 and ran == ["early"]
    clock.now = 105.0
    assert timer.run_due() is None and ran == ["early", "late"]
    assert timer.run_due() is None and ran == ["early", "late"]  # once each


def test_scheduling_a_key_again_moves_it(timer: Timer, clock: FakeClock) -> None:
    ran: list[str] = []
    timer.schedule("k", 101.0, lambda: ran.append("first"))
    timer.schedule("k", 103.0, lambda: ran.append("second"))
    assert timer.due("k") == 103.0
    clock.now = 102.0
    timer.run_due()
    assert ran == []
    clock.now = 103.0
    timer.run_due()
    assert ran == ["second"]


def test_a_cancelled_key_never_runs(timer: Timer, clock: FakeClock) -> None:
    ran: list[str] = []
    timer.schedule("k", 101.0, lambda: ran.append("k"))
    timer.cancel("k")
    timer.cancel("never-scheduled")
    clock.now = 200.0
    assert timer.run_due() is None and ran == [] and timer.due("k") is None


def test_a_callback_may_reschedule_its_own_key(timer: Timer, clock: FakeClock) -> None:
    beats: list[float] = []

    def beat() -> None:
        beats.append(clock.now)
        if len(beats) < 3:
            timer.schedule("beat", clock.now + 1.0, beat)

    timer.schedule("beat", 101.0, beat)
    for now in (101.0, 102.0, 103.0, 104.0):
        clock.now = now
        timer.run_due()
    assert beats == [101.0, 102.0, 103.0]
    assert timer.due("beat") is None


def test_a_failing_callback_is_logged_and_the_rest_run(
    timer: Timer, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    ran: list[str] = []

    def broken() -> None:
        raise KeyError("bug")

    timer.schedule("broken", 101.0, broken)
    timer.schedule("fine", 101.0, lambda: ran.append("fine"))
    clock.now = 101.0
    timer.run_due()
    assert ran == ["fine"]
    assert "timer callback for 'broken' failed" in caplog.text


def test_a_callback_cancelling_its_own_key_does_not_wait_for_itself(timer: Timer, clock: FakeClock) -> None:
    ran: list[str] = []

    def cancel_self() -> None:
        timer.cancel("k")
        ran.append("k")

    timer.schedule("k", 101.0, cancel_self)
    clock.now = 101.0
    timer.run_due()
    assert ran == ["k"]


def test_the_thread_runs_callbacks_when_due() -> None:
    timer = Timer()
    done = threading.Event()
    names: list[str] = []

    def record() -> None:
        names.append(threading.current_thread().name)
        done.set()

    timer.schedule("soon", timer.clock() + 0.01, record)
    assert done.wait(HANG_S), "the timer never ran the callback"
    assert names == ["cascade-timer"]


def test_an_earlier_entry_wakes_the_thread() -> None:
    timer = Timer()
    done = threading.Event()
    timer.schedule("far", timer.clock() + 3_600, lambda: None)  # the thread sleeps for an hour
    timer.schedule("near", timer.clock(), done.set)
    assert done.wait(HANG_S), "the thread slept through an earlier entry"
    timer.cancel("far")


def test_cancel_waits_for_its_own_callback_in_flight_only() -> None:
    timer = Timer()
    running, release = threading.Event(), threading.Event()

    def stall() -> None:
        running.set()
        release.wait(HANG_S)

    timer.schedule("slow", timer.clock(), stall)
    assert running.wait(HANG_S)
    other = threading.Thread(
        target=lambda: (timer.schedule("other", timer.clock() + 60, lambda: None), timer.cancel("other"))
    )
    other.start()
    other.join(HANG_S)
    assert not other.is_alive(), "cancelling another key waited for a callback in flight"
    cancelled = threading.Event()
    canceller = threading.Thread(target=lambda: (timer.cancel("slow"), cancelled.set()))
    canceller.start()
    try:
        assert not cancelled.wait(0.2), "cancel returned while its key's callback was in flight"
    finally:
        release.set()
    canceller.join(HANG_S)
    assert cancelled.is_set()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_starts_with_an_empty_timer() -> None:
    TIMER.schedule("parent-only", TIMER.clock() + 3_600, lambda: None)
    try:
        pid = os.fork()
        if pid == 0:  # the child: exit status says what it found
            os._exit(0 if TIMER.due("parent-only") is None and TIMER._thread is None else 1)
        _pid, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert TIMER.due("parent-only") is not None
    finally:
        TIMER.cancel("parent-only")


def test_a_key_cancelled_while_its_callback_runs_is_not_rescheduled_by_it(timer: Timer, clock: FakeClock) -> None:
    def beat() -> None:
        timer.cancel("beat")  # stands in for a cancel from another thread while the beat runs
        timer.schedule("beat", clock.now + 1.0, beat)

    timer.schedule("beat", 101.0, beat)
    clock.now = 101.0
    timer.run_due()
    assert timer.due("beat") is None
