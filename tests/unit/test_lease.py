"""Request leases (worker/state/lease.py): the process's timer renews them every third of their TTL,
without holding up the request threads that take and give them up."""

from __future__ import annotations

import threading
from typing import Any

import fakeredis

from providers.timer import Timer
from worker.state.lease import RequestLease

# Bounds of the waits below: far longer than any step takes, so only a hang reaches them.
HANG_S = 10.0


class StallingRedis:
    """A Redis client whose lease renewals (EVAL) block until ``release`` is set, as on a
    connection to a primary that went silent."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.renewing = threading.Event()

    def evalsha(self, *_args: Any) -> int:
        self.renewing.set()
        self.release.wait(HANG_S)
        return 1


def run_in_thread(action: Any) -> threading.Thread:
    thread = threading.Thread(target=action, daemon=True)
    thread.start()
    return thread


def test_a_stalled_renewal_does_not_hold_up_other_leases() -> None:
    """While one lease's renewal waits on a silent Redis, another request can still take and
    give up its lease: the renewal runs outside the timer's lock."""
    timer = Timer()
    stalling = StallingRedis()
    stalled = RequestLease(stalling, "stalled", ttl_s=0.03, timer=timer)  # type: ignore[arg-type]
    other = RequestLease(fakeredis.FakeRedis(), "other", ttl_s=60, timer=timer)
    try:
        stalled.start_renewing()
        assert stalling.renewing.wait(HANG_S), "the timer never renewed"

        taking = run_in_thread(lambda: (other.start_renewing(), other.stop_renewing()))
        taking.join(HANG_S)
        assert not taking.is_alive(), "taking a lease waited for another lease's renewal"
        assert not stalling.release.is_set(), "the renewal was still in flight meanwhile"
    finally:
        stalling.release.set()
        stalled.stop_renewing()


def test_stopping_the_renewals_waits_for_its_own_renewal_in_flight() -> None:
    timer = Timer()
    stalling = StallingRedis()
    lease = RequestLease(stalling, "slow", ttl_s=0.03, timer=timer)  # type: ignore[arg-type]
    lease.start_renewing()
    assert stalling.renewing.wait(HANG_S)
    stopped = threading.Event()
    stopper = run_in_thread(lambda: (lease.stop_renewing(), stopped.set()))
    try:
        assert not stopped.wait(0.2), "stop_renewing returned while its lease's renewal was in flight"
    finally:
        stalling.release.set()
    stopper.join(HANG_S)
    assert stopped.is_set() and not stopper.is_alive()
    assert timer.due(lease) is None  # and the renewal that was in flight scheduled no other


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_a_lease_is_renewed_every_third_of_its_ttl_until_it_is_taken_over() -> None:
    client = fakeredis.FakeRedis()
    clock = Clock()
    timer = Timer(clock=clock, threaded=False)
    lease = RequestLease(client, "r-1", ttl_s=3.0, timer=timer)
    client.set(lease.key, lease.token, px=3_000)  # as the run's opening took it
    lease.start_renewing()
    assert timer.due(lease) == 51.0
    clock.now = 51.0
    timer.run_due()
    assert timer.due(lease) == 52.0 and not lease.lost
    assert 2_000 < (client.pttl(lease.key) or 0) <= 3_000
    client.set(lease.key, "another-worker:token")
    clock.now = 52.0
    timer.run_due()
    assert lease.lost and timer.due(lease) is None  # a lease taken over is not renewed again
