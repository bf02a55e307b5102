"""Request leases (worker/state/lease.py): the heartbeat renews them without holding up the request
threads that take and give them up."""

from __future__ import annotations

import threading
from typing import Any

import fakeredis

from worker.state.lease import RequestLease, _Heartbeat

# Bounds of the waits below: far longer than any step takes, so only a hang reaches them.
HANG_S = 10.0


class StallingRedis:
    """A Redis client whose lease renewals (EVAL) block until ``release`` is set, as on a
    connection to a primary that went silent."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.renewing = threading.Event()

    def eval(self, *_args: Any) -> int:
        self.renewing.set()
        self.release.wait(HANG_S)
        return 1


def run_in_thread(action: Any) -> threading.Thread:
    thread = threading.Thread(target=action, daemon=True)
    thread.start()
    return thread


def test_a_stalled_renewal_does_not_hold_up_other_leases() -> None:
    """While one lease's renewal waits on a silent Redis, another request can still take and
    give up its lease: the heartbeat renews outside its lock."""
    heartbeat = _Heartbeat()
    stalling = StallingRedis()
    stalled = RequestLease(stalling, "stalled", ttl_s=0.03, record_ttl_s=60)  # type: ignore[arg-type]
    other = RequestLease(fakeredis.FakeRedis(), "other", ttl_s=60, record_ttl_s=60)
    try:
        heartbeat.add(stalled)
        assert stalling.renewing.wait(HANG_S), "the heartbeat never renewed"

        taking = run_in_thread(lambda: (heartbeat.add(other), heartbeat.remove(other)))
        taking.join(HANG_S)
        assert not taking.is_alive(), "taking a lease waited for another lease's renewal"
        assert not stalling.release.is_set(), "the renewal was still in flight meanwhile"
    finally:
        stalling.release.set()


def test_removing_a_lease_waits_for_its_own_renewal_in_flight() -> None:
    heartbeat = _Heartbeat()
    stalling = StallingRedis()
    lease = RequestLease(stalling, "slow", ttl_s=0.03, record_ttl_s=60)  # type: ignore[arg-type]
    heartbeat.add(lease)
    assert stalling.renewing.wait(HANG_S)
    removed = threading.Event()
    remover = run_in_thread(lambda: (heartbeat.remove(lease), removed.set()))
    try:
        assert not removed.wait(0.2), "remove returned while its lease's renewal was in flight"
    finally:
        stalling.release.set()
    remover.join(HANG_S)
    assert removed.is_set() and not remover.is_alive()
    assert lease not in heartbeat._due
