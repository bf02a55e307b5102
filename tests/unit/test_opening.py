"""The run's first round trip (``worker.state.opening``) and its last (``EventPublisher.finish``), on
fakeredis: the opening takes the lease, records the message, reads where the request stands and
publishes a new request's ``start`` event, or takes nothing when another worker holds it; the
finish publishes a waiting chunk, the terminal event and the reply, and releases the lease."""

from __future__ import annotations

import fakeredis

from tasks.contract import keys
from tasks.contract.schemas import ChatReply, StreamEvent
from worker.state.lease import INFLIGHT_KEY, INFLIGHT_SET, RequestLease
from worker.state.opening import Opening, open_run
from worker.state.publisher import EventPublisher, start_event
from worker.state.store import ReplyStore

RID = "opening-1"
COOLDOWN_KEY = "cascade:cooldown:steady"


def lease_for(client: fakeredis.FakeRedis, worker: str = "w/1") -> RequestLease:
    return RequestLease(client, RID, ttl_s=30, record_ttl_s=60, worker=worker)


def open_with(client: fakeredis.FakeRedis, lease: RequestLease, *, start: bool = True) -> Opening | None:
    return open_run(
        client,
        lease,
        ("chat", {"request": {"request_id": RID}}),
        cooldown_key=COOLDOWN_KEY,
        start_event=start_event(RID, "default", "w/1") if start else None,
        events_maxlen=100,
        events_ttl_s=600,
    )


def events(client: fakeredis.FakeRedis) -> list[StreamEvent]:
    entries = client.xrange(keys.events_stream(RID))
    return [StreamEvent.model_validate_json(fields[keys.EVENT_FIELD.encode()]) for _id, fields in entries]


def test_a_new_request_is_leased_recorded_and_started_in_one_script(fake_redis: fakeredis.FakeRedis) -> None:
    lease = lease_for(fake_redis)
    opening = open_with(fake_redis, lease)
    try:
        assert opening == Opening(last_event=[], stored_reply=None, cancelled=False, cooling=False, started=True)
        assert fake_redis.get(lease.key) == lease.token.encode()
        assert fake_redis.exists(INFLIGHT_KEY.format(request_id=RID))
        assert fake_redis.zscore(INFLIGHT_SET, RID) is not None
        [start] = events(fake_redis)
        assert (start.type, start.seq, start.chain, start.worker) == ("start", 0, "default", "w/1")
        assert 0 < (fake_redis.ttl(keys.events_stream(RID)) or 0) <= 600
    finally:
        lease.release()


def test_a_request_held_by_another_worker_is_left_alone(fake_redis: fakeredis.FakeRedis) -> None:
    holder = lease_for(fake_redis, worker="w/2")
    assert holder.acquire("chat", {"request": {}})
    try:
        assert open_with(fake_redis, lease_for(fake_redis)) is None
        assert events(fake_redis) == []
        assert fake_redis.get(holder.key) == holder.token.encode()
    finally:
        holder.release()


def test_a_request_with_events_reads_the_last_one_and_publishes_nothing(fake_redis: fakeredis.FakeRedis) -> None:
    first = EventPublisher(fake_redis, RID, store=ReplyStore(fake_redis, 60), events_maxlen=100, events_ttl_s=600)
    first.emit("start", chain="default", worker="w/0")
    first.emit("chunk", delta="Hel", provider="steady", attempt=1)
    fake_redis.set(keys.cancel_key(RID), "1")
    fake_redis.set(COOLDOWN_KEY, "1")
    lease = lease_for(fake_redis)
    opening = open_with(fake_redis, lease)
    try:
        assert opening is not None and not opening.started
        assert opening.cancelled and opening.cooling
        assert EventPublisher.seq_after(opening.last_event) == 2
        assert [event.type for event in events(fake_redis)] == ["start", "chunk"]
    finally:
        lease.release()


def test_an_answered_request_returns_its_reply_and_publishes_nothing(fake_redis: fakeredis.FakeRedis) -> None:
    stored = ChatReply(request_id=RID, status="succeeded").model_dump_json()
    fake_redis.set(keys.reply_key(RID), stored)
    lease = lease_for(fake_redis)
    opening = open_with(fake_redis, lease)
    try:
        assert opening is not None and opening.stored_reply == stored.encode() and not opening.started
        assert events(fake_redis) == []
    finally:
        lease.release()


def test_a_hand_off_publishes_no_start_event(fake_redis: fakeredis.FakeRedis) -> None:
    lease = lease_for(fake_redis)
    opening = open_with(fake_redis, lease, start=False)
    try:
        assert opening is not None and not opening.started and events(fake_redis) == []
    finally:
        lease.release()


def test_the_finish_publishes_the_waiting_chunk_then_releases_the_lease(fake_redis: fakeredis.FakeRedis) -> None:
    lease = lease_for(fake_redis)
    opening = open_with(fake_redis, lease)
    assert opening is not None and opening.started
    publisher = EventPublisher(
        fake_redis,
        RID,
        store=ReplyStore(fake_redis, 60),
        events_maxlen=100,
        events_ttl_s=600,
        next_seq=1,
        lease=lease,
        coalesce_s=60.0,  # every chunk after the first waits
        stream_ttl_set=True,
    )
    for delta in ("Hel", "lo ", "world"):
        publisher.emit("chunk", delta=delta, provider="steady", attempt=1)
    assert publisher.finish("done", ChatReply(request_id=RID, status="succeeded"))

    stream = events(fake_redis)
    assert [(e.type, e.seq, e.delta) for e in stream] == [
        ("start", 0, None),
        ("chunk", 1, "Hel"),
        ("chunk", 2, "lo world"),
        ("done", 3, None),
    ]
    assert lease.released
    assert not fake_redis.exists(lease.key, INFLIGHT_KEY.format(request_id=RID))
    assert fake_redis.zscore(INFLIGHT_SET, RID) is None
    assert fake_redis.exists(keys.reply_key(RID))


def test_a_retried_opening_finds_its_own_lease_and_goes_on(fake_redis: fakeredis.FakeRedis) -> None:
    lease = lease_for(fake_redis)
    first = open_with(fake_redis, lease)  # its reply was lost with the connection: the call is retried
    again = open_with(fake_redis, lease)
    try:
        assert first is not None and first.started
        assert again is not None and not again.started  # the start event is not published twice
        assert EventPublisher.seq_after(again.last_event) == 1
        assert [e.type for e in events(fake_redis)] == ["start"]
    finally:
        lease.release()
