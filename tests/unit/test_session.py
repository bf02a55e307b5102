"""A run's owner in Redis (worker/state/session.py), on fakeredis: the opening takes the lease,
records the message, reads where the request stands and publishes a new request's ``start``
event, or takes nothing when another worker holds it; the finish publishes a waiting chunk, the
terminal event and the reply, and releases the lease; a hand-off records the request as pending
and releases the lease before it sends; an abandoned run keeps its lease to lapse."""

from __future__ import annotations

import json
import time
from typing import Any

import fakeredis
import pytest
import redis

from providers.timer import Timer
from tasks.contract import keys
from tasks.contract.schemas import ChatReply, StreamEvent
from tests.support.sessions import session_for
from worker.state.publisher import EventPublisher
from worker.state.session import Opening, RunSession
from worker.state.store import ReplyStore

RID = "opening-1"
COOLDOWN_KEY = keys.cooldown_key("steady")
MESSAGE = {"request": {"request_id": RID}}
WINDOW = (1_000.0, 1_300.0)


@pytest.fixture
def timer() -> Timer:
    """A timer with no thread: no renewal runs while a test looks."""
    return Timer(threaded=False)


def open_with(session: RunSession, *, start: bool = True) -> Opening | None:
    return session.open(
        "chat", MESSAGE, window=WINDOW, start_chain="default" if start else None, cooldown_key=COOLDOWN_KEY
    )


def events(client: fakeredis.FakeRedis) -> list[StreamEvent]:
    entries = client.xrange(keys.events_stream(RID))
    return [StreamEvent.model_validate_json(fields[keys.EVENT_FIELD.encode()]) for _id, fields in entries]


def test_a_new_request_is_leased_recorded_and_started_in_one_script(
    fake_redis: fakeredis.FakeRedis, timer: Timer
) -> None:
    with session_for(fake_redis, RID, timer=timer) as session:
        opening = open_with(session)
        assert opening == Opening(last_event=[], stored_reply=None, cancelled=False, cooling=False, started=True)
        assert fake_redis.get(session.lease.key) == session.lease.token.encode()
        record = json.loads(fake_redis.get(keys.inflight_record(RID)) or "")
        assert record == {
            "queue": "chat",
            "kwargs": MESSAGE,
            "task": "cascade.chat",
            "started_at": WINDOW[0],
            "deadline_at": WINDOW[1],
        }
        assert fake_redis.zscore(keys.INFLIGHT_SET, RID) is not None
        [start] = events(fake_redis)
        assert (start.type, start.seq, start.chain, start.worker) == ("start", 0, "default", "w/1")
        assert 0 < (fake_redis.ttl(keys.events_stream(RID)) or 0) <= 600
        assert session.next_seq == 1 and timer.due(session.lease) is not None  # renewed from now on
    assert not fake_redis.exists(session.lease.key, keys.inflight_record(RID))  # released on the way out
    assert timer.due(session.lease) is None


def test_a_request_held_by_another_worker_is_left_alone(fake_redis: fakeredis.FakeRedis, timer: Timer) -> None:
    with session_for(fake_redis, RID, worker="w/2", timer=timer) as holder:
        assert open_with(holder, start=False) is not None
        with session_for(fake_redis, RID, timer=timer) as duplicate:
            assert open_with(duplicate) is None
        assert events(fake_redis) == []
        assert fake_redis.get(holder.lease.key) == holder.lease.token.encode()  # the duplicate let go of nothing


def test_a_request_with_events_reads_the_last_one_and_publishes_nothing(
    fake_redis: fakeredis.FakeRedis, timer: Timer
) -> None:
    first = EventPublisher(fake_redis, RID, store=ReplyStore(fake_redis, 60), events_maxlen=100, events_ttl_s=600)
    first.emit("start", chain="default", worker="w/0")
    first.emit("chunk", delta="Hel", provider="steady", attempt=1)
    fake_redis.set(keys.cancel_key(RID), "1")
    fake_redis.set(COOLDOWN_KEY, "1")
    with session_for(fake_redis, RID, timer=timer) as session:
        opening = open_with(session)
        assert opening is not None and not opening.started
        assert opening.cancelled and opening.cooling
        assert EventPublisher.seq_after(opening.last_event) == 2 == session.next_seq
        assert [event.type for event in events(fake_redis)] == ["start", "chunk"]


def test_an_answered_request_returns_its_reply_and_publishes_nothing(
    fake_redis: fakeredis.FakeRedis, timer: Timer
) -> None:
    stored = ChatReply(request_id=RID, status="succeeded").model_dump_json()
    fake_redis.set(keys.reply_key(RID), stored)
    with session_for(fake_redis, RID, timer=timer) as session:
        opening = open_with(session)
        assert opening is not None and opening.stored_reply == stored.encode() and not opening.started
        assert events(fake_redis) == []


def test_a_hand_off_publishes_no_start_event(fake_redis: fakeredis.FakeRedis, timer: Timer) -> None:
    with session_for(fake_redis, RID, timer=timer) as session:
        opening = session.open("chat", MESSAGE, window=WINDOW, start_chain=None, cooldown_key=None, next_seq=4)
        assert opening is not None and not opening.started and opening.cooling is None
        assert events(fake_redis) == [] and session.next_seq == 4


def test_the_finish_publishes_the_waiting_chunk_then_releases_the_lease(
    fake_redis: fakeredis.FakeRedis, timer: Timer
) -> None:
    session = session_for(fake_redis, RID, timer=timer, coalesce_s=60.0)  # every chunk after the first waits
    with session:
        assert (opening := open_with(session)) is not None and opening.started
        for delta in ("Hel", "lo ", "world"):
            session.emit("chunk", delta=delta, provider="steady", attempt=1)
        assert session.finish("done", ChatReply(request_id=RID, status="succeeded"))
        assert timer.due(session.lease) is None
        assert not fake_redis.exists(session.lease.key, keys.inflight_record(RID))

    stream = events(fake_redis)
    assert [(e.type, e.seq, e.delta) for e in stream] == [
        ("start", 0, None),
        ("chunk", 1, "Hel"),
        ("chunk", 2, "lo world"),
        ("done", 3, None),
    ]
    assert fake_redis.zscore(keys.INFLIGHT_SET, RID) is None
    assert fake_redis.exists(keys.reply_key(RID))


def test_a_retried_opening_finds_its_own_lease_and_goes_on(fake_redis: fakeredis.FakeRedis, timer: Timer) -> None:
    with session_for(fake_redis, RID, timer=timer) as session:
        first = open_with(session)  # its reply was lost with the connection: the call is retried
        again = open_with(session)
        assert first is not None and first.started
        assert again is not None and not again.started  # the start event is not published twice
        assert EventPublisher.seq_after(again.last_event) == 1
        assert [e.type for e in events(fake_redis)] == ["start"]


class Recording:
    """A TaskSender that records what the Redis state was when it sent."""

    def __init__(self, client: fakeredis.FakeRedis) -> None:
        self._client = client
        self.sent: list[tuple[str, dict[str, Any], str | None, bool, bool]] = []

    def send(self, queue: str, kwargs: dict[str, Any], request_id: str | None = None, *, task: str = "") -> None:
        assert task == "cascade.chat"
        leased = bool(self._client.exists(keys.lease_key(RID)))
        pending = self._client.zscore(keys.PENDING_SET, RID) is not None
        self.sent.append((queue, kwargs, request_id, leased, pending))


def test_a_hand_off_records_the_request_pending_and_lets_the_lease_go_before_it_sends(
    fake_redis: fakeredis.FakeRedis, timer: Timer
) -> None:
    sender = Recording(fake_redis)
    session = session_for(fake_redis, RID, timer=timer, sender=sender, coalesce_s=60.0)
    assert session.can_hand_off
    with session:
        assert open_with(session) is not None
        session.emit("chunk", delta="a", provider="steady", attempt=1)
        session.emit("chunk", delta="b", provider="steady", attempt=1)  # waits for its window
        kwargs = {"request": {"request_id": RID}, "handoff": {"next_seq": 3}}
        session.hand_off("chat.gpu", kwargs)
    assert sender.sent == [("chat.gpu", kwargs, RID, False, True)]
    assert json.loads(fake_redis.get(keys.pending_record(RID)) or "") == {
        "queue": "chat.gpu",
        "kwargs": kwargs,
        "task": "cascade.chat",
    }
    assert not fake_redis.exists(keys.inflight_record(RID)) and fake_redis.zscore(keys.INFLIGHT_SET, RID) is None
    assert [e.delta for e in events(fake_redis) if e.type == "chunk"] == ["a", "b"]  # flushed before the send


def test_a_session_without_a_sender_cannot_hand_off(fake_redis: fakeredis.FakeRedis, timer: Timer) -> None:
    with session_for(fake_redis, RID, timer=timer) as session:
        assert open_with(session) is not None and not session.can_hand_off
        with pytest.raises(RuntimeError):
            session.hand_off("chat.gpu", {})
        assert fake_redis.exists(session.lease.key)


def test_a_run_cut_off_from_redis_keeps_its_lease_to_lapse(fake_redis: fakeredis.FakeRedis, timer: Timer) -> None:
    session = session_for(fake_redis, RID, timer=timer)
    with pytest.raises(redis.ConnectionError), session:
        assert open_with(session) is not None
        raise redis.ConnectionError("cut off")
    assert fake_redis.get(session.lease.key) == session.lease.token.encode()
    assert fake_redis.exists(keys.inflight_record(RID))  # for a reaper to resend
    assert timer.due(session.lease) is None  # no longer renewed
    session.close()
    assert fake_redis.exists(session.lease.key)


def test_a_run_that_ends_otherwise_releases_its_lease(fake_redis: fakeredis.FakeRedis, timer: Timer) -> None:
    session = session_for(fake_redis, RID, timer=timer)
    with pytest.raises(KeyError), session:
        assert open_with(session) is not None
        raise KeyError("a bug")
    assert not fake_redis.exists(session.lease.key, keys.inflight_record(RID))
    assert fake_redis.zscore(keys.INFLIGHT_SET, RID) is None


def test_the_window_is_recorded_for_a_resumed_run(fake_redis: fakeredis.FakeRedis, timer: Timer) -> None:
    now = time.time()
    with session_for(fake_redis, RID, timer=timer) as session:
        session.open("chat", MESSAGE, window=(now, now + 5), start_chain=None, cooldown_key=None)
        record = json.loads(fake_redis.get(keys.inflight_record(RID)) or "")
        assert (record["started_at"], record["deadline_at"]) == (now, now + 5)
        session.abandon()
