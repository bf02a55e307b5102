"""EventPublisher on fakeredis: seq, pub/sub + stream, TTL, bounds, cancel, the terminal event."""

from __future__ import annotations

import json
import time
from typing import Any

import fakeredis
import pytest

from tasks.contract import keys
from tasks.contract.schemas import ChatReply, ErrorInfo, StreamEvent
from worker.state.lease import LeaseLost
from worker.state.publisher import MAX_WINDOW_S, EventPublisher, StreamClosed, chunk_budget
from worker.state.store import ReplyStore

RID = "req-1"


def publisher(client: fakeredis.FakeRedis, *, maxlen: int = 1_000, ttl_s: int = 600, **kw: Any) -> EventPublisher:
    return EventPublisher(
        client, RID, store=ReplyStore(client, ttl_s=3_600), events_maxlen=maxlen, events_ttl_s=ttl_s, **kw
    )


def stored_events(client: fakeredis.FakeRedis, request_id: str = RID) -> list[StreamEvent]:
    entries = client.xrange(keys.events_stream(request_id))
    return [StreamEvent.model_validate_json(fields[keys.EVENT_FIELD.encode()]) for _id, fields in entries]


def published(pubsub: Any) -> list[StreamEvent]:
    events = []
    while (message := pubsub.get_message(ignore_subscribe_messages=True, timeout=0.01)) is not None:
        events.append(StreamEvent.model_validate_json(message["data"]))
    return events


@pytest.fixture
def pubsub(fake_redis: fakeredis.FakeRedis) -> Any:
    subscriber = fake_redis.pubsub()
    subscriber.subscribe(keys.stream_channel(RID))
    assert subscriber.get_message(timeout=0.1)["type"] == "subscribe"
    return subscriber


def _reply(status: str = "succeeded") -> ChatReply:
    return ChatReply(request_id=RID, status=status)  # type: ignore[arg-type]


def test_seq_starts_at_zero_and_increases(fake_redis: fakeredis.FakeRedis) -> None:
    pub = publisher(fake_redis)
    pub.emit("start", chain="default", worker="w")
    for delta in ("a", "b", "c"):
        pub.emit("chunk", delta=delta, provider="p", attempt=1)
    pub.finish("done", _reply())
    events = stored_events(fake_redis)
    assert [e.seq for e in events] == [0, 1, 2, 3, 4]
    assert [e.type for e in events] == ["start", "chunk", "chunk", "chunk", "done"]
    assert all(e.request_id == RID and e.v == 1 and e.ts is not None for e in events)
    assert pub.next_seq == 5


def test_every_event_is_published_and_stored(fake_redis: fakeredis.FakeRedis, pubsub: Any) -> None:
    pub = publisher(fake_redis)
    pub.emit("start", chain="default")
    pub.emit("chunk", delta="hi", provider="p", attempt=1)
    pub.emit("fallback", provider="p", attempt=1, error_type="stream_interrupted")
    pub.finish("error", _reply("failed"), error=ErrorInfo(type="all_providers_failed", message="m"))
    live = published(pubsub)
    assert live == stored_events(fake_redis)
    assert [e.type for e in live] == ["start", "chunk", "fallback", "error"]
    assert live[1].delta == "hi" and live[2].error_type == "stream_interrupted"
    assert live[3].error is not None and live[3].error.type == "all_providers_failed"


def test_events_are_compact_json(fake_redis: fakeredis.FakeRedis) -> None:
    publisher(fake_redis).emit("chunk", delta="x", provider="p", attempt=1)
    _id, fields = fake_redis.xrange(keys.events_stream(RID))[0]
    assert list(fields) == [b"event"]
    payload = json.loads(fields[b"event"])
    assert "reply" not in payload and "error" not in payload  # None fields are left out


def test_events_stream_has_a_ttl(fake_redis: fakeredis.FakeRedis) -> None:
    publisher(fake_redis, ttl_s=120).emit("start")
    assert 0 < fake_redis.ttl(keys.events_stream(RID)) <= 120


def test_a_long_stream_stays_within_maxlen_and_replays_from_the_start(fake_redis: fakeredis.FakeRedis) -> None:
    pub = publisher(fake_redis, maxlen=50)
    pub.emit("start", chain="default", worker="w")
    deltas = [f"token {n} " for n in range(1_000)]
    for delta in deltas:
        pub.emit("chunk", delta=delta, provider="provider-id", attempt=1)
    pub.emit("fallback", provider="provider-id", attempt=1, error_type="stream_interrupted")
    for delta in deltas:
        pub.emit("chunk", delta=delta, provider="other", attempt=2)
    assert pub.finish("done", _reply())
    events = stored_events(fake_redis)
    assert len(events) <= 50
    assert [event.seq for event in events] == list(range(len(events)))  # nothing trimmed from the start
    assert events[0].type == "start" and events[-1].type == "done"
    for attempt in (1, 2):
        text = "".join(event.delta or "" for event in events if event.type == "chunk" and event.attempt == attempt)
        assert text == "".join(deltas)
    assert [event.type for event in events].count("fallback") == 1


def test_chunks_past_the_budget_wait_for_the_terminal_event(fake_redis: fakeredis.FakeRedis) -> None:
    budget = chunk_budget(10)
    pub = publisher(fake_redis, maxlen=10, next_seq=budget)  # a resumed request that spent its budget
    for delta in "abc":
        assert pub.emit("chunk", delta=delta, provider="p", attempt=1) is False
    assert stored_events(fake_redis) == []
    pub.finish("done", _reply())
    assert [(event.type, event.seq, event.delta) for event in stored_events(fake_redis)] == [
        ("chunk", budget, "abc"),
        ("done", budget + 1, None),
    ]


def test_a_held_chunk_still_reads_the_cancel_key(fake_redis: fakeredis.FakeRedis) -> None:
    pub = publisher(fake_redis, maxlen=10, next_seq=chunk_budget(10))
    pub.emit("chunk", delta="a", provider="p", attempt=1)
    fake_redis.set(keys.cancel_key(RID), "1")
    cancelled = False
    for _ in range(400):  # a check every MAX_WINDOW_S: bounded by count, not by a clock assertion
        if pub.emit("chunk", delta="b", provider="p", attempt=1):
            cancelled = True
            break
        time.sleep(MAX_WINDOW_S / 100)
    assert cancelled
    assert stored_events(fake_redis) == []


def test_emit_reports_a_cancel(fake_redis: fakeredis.FakeRedis) -> None:
    pub = publisher(fake_redis)
    assert pub.emit("start") is False
    assert pub.cancel_requested() is False
    fake_redis.set(keys.cancel_key(RID), "1")
    assert pub.emit("chunk", delta="x", provider="p", attempt=1) is True
    assert pub.cancel_requested() is True
    assert len(stored_events(fake_redis)) == 2  # the event is still published


def test_a_cancel_of_another_request_is_ignored(fake_redis: fakeredis.FakeRedis) -> None:
    fake_redis.set(keys.cancel_key("other"), "1")
    assert publisher(fake_redis).emit("start") is False


def test_finish_stores_the_reply_and_one_terminal_event(fake_redis: fakeredis.FakeRedis, pubsub: Any) -> None:
    pub = publisher(fake_redis)
    pub.emit("start")
    reply = _reply()
    pub.finish("done", reply)
    stored = ReplyStore(fake_redis, ttl_s=1).get(RID)
    assert stored == reply
    assert 0 < fake_redis.ttl(keys.reply_key(RID)) <= 3_600
    live = published(pubsub)
    assert [e.type for e in live if e.is_terminal] == ["done"]
    assert live[-1].reply == reply
    assert pub.closed


@pytest.mark.parametrize("status", ["cancelled", "error"])
def test_finish_with_other_terminal_types(fake_redis: fakeredis.FakeRedis, status: str) -> None:
    reply = _reply("cancelled" if status == "cancelled" else "failed")
    publisher(fake_redis).finish(status, reply)
    events = stored_events(fake_redis)
    assert [e.type for e in events] == [status]
    assert events[0].reply is not None and events[0].reply.status == reply.status


def test_nothing_after_finish(fake_redis: fakeredis.FakeRedis) -> None:
    pub = publisher(fake_redis)
    pub.finish("done", _reply())
    with pytest.raises(StreamClosed):
        pub.emit("chunk", delta="late", provider="p", attempt=1)
    with pytest.raises(StreamClosed):
        pub.finish("error", _reply("failed"))
    assert [e.type for e in stored_events(fake_redis)] == ["done"]
    assert ReplyStore(fake_redis, ttl_s=1).get(RID) == _reply()  # the second finish stored nothing


def test_terminal_and_non_terminal_types_are_kept_apart(fake_redis: fakeredis.FakeRedis) -> None:
    pub = publisher(fake_redis)
    with pytest.raises(ValueError):
        pub.emit("done")
    with pytest.raises(ValueError):
        pub.finish("chunk", _reply())
    assert fake_redis.exists(keys.events_stream(RID)) == 0


def test_resume_seq(fake_redis: fakeredis.FakeRedis) -> None:
    assert EventPublisher.resume_seq(fake_redis, RID) == 0
    first = publisher(fake_redis)
    for _ in range(3):
        first.emit("chunk", delta="x", provider="p", attempt=1)
    resumed_at = EventPublisher.resume_seq(fake_redis, RID)
    assert resumed_at == 3
    publisher(fake_redis, next_seq=resumed_at).finish("done", _reply())
    assert [e.seq for e in stored_events(fake_redis)] == [0, 1, 2, 3]


def test_a_worker_that_lost_its_lease_writes_nothing_more(fake_redis: fakeredis.FakeRedis) -> None:
    fake_redis.set(keys.lease_key(RID), "w/1:token")  # this worker's run holds the lease
    pub = publisher(fake_redis, token="w/1:token")
    pub.emit("start", chain="default", worker="w/1")
    fake_redis.set(keys.lease_key(RID), "w/2:token")  # another worker took the request over
    with pytest.raises(LeaseLost):
        pub.emit("chunk", delta="late", provider="p", attempt=1)
    with pytest.raises(LeaseLost):
        pub.emit("fallback", provider="p", attempt=1, error_type="stream_interrupted")
    with pytest.raises(LeaseLost):
        pub.finish("done", _reply())
    assert [event.type for event in stored_events(fake_redis)] == ["start"]  # the new owner's seq 1 is free
    assert pub.next_seq == 1
    assert not fake_redis.exists(keys.reply_key(RID))


def test_a_publisher_without_a_lease_writes_nothing_for_a_leased_request(fake_redis: fakeredis.FakeRedis) -> None:
    fake_redis.set(keys.lease_key(RID), "w/2:token")  # the request runs on another worker
    pub = publisher(fake_redis)
    assert pub.finish("error", _reply("failed"), error=ErrorInfo(type="invalid_request", message="m")) is False
    assert pub.leased_elsewhere
    assert stored_events(fake_redis) == [] and not fake_redis.exists(keys.reply_key(RID))
    with pytest.raises(LeaseLost):
        publisher(fake_redis).emit("start")
    assert fake_redis.get(keys.lease_key(RID)) == b"w/2:token"


def test_the_reply_forgets_the_request_s_resend_count(fake_redis: fakeredis.FakeRedis) -> None:
    fake_redis.hset(keys.RESENDS, mapping={RID: 2, "other": 1})
    assert publisher(fake_redis).finish("done", _reply())
    assert fake_redis.hgetall(keys.RESENDS) == {b"other": b"1"}
