"""Chunk coalescing in EventPublisher (``coalesce_s``, ``CASCADE_COALESCE_MS``), on fakeredis:
the text arrives whole, ``seq`` strictly increases, the terminal event comes last and flushes
the waiting text, a waiting chunk goes out within its window, cancels and lost leases still
reach the request's thread. Also the runner's read-ahead of the first provider's cooldown in
its first round trip."""

from __future__ import annotations

import itertools
import threading
from typing import Any

import fakeredis
import pytest

from providers.timer import Timer
from settings import ScriptedConfig, Settings
from tasks.contract import keys
from tasks.contract.schemas import ChatReply, ChatRequest, StreamEvent
from tasks.runner import RequestRunner, TaskContext
from tests.support.clock import FakeClock, threadless_timer
from worker.runtime import build_runtime
from worker.state.lease import LeaseLost
from worker.state.publisher import EventPublisher
from worker.state.session import RunSession
from worker.state.store import ReplyStore

RID = "coalesce-1"
WINDOW_S = 0.05


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=1_000.0)


@pytest.fixture
def timer(clock: FakeClock) -> Timer:
    """A timer with no thread: a test runs what is due with ``pass_time``."""
    return threadless_timer(clock)


def pass_time(timer: Timer, clock: FakeClock, seconds: float) -> None:
    """Move the clock on and run what came due (the flush at a window's end)."""
    clock.now += seconds
    timer.run_due()


def publisher(client: fakeredis.FakeRedis, timer: Timer, coalesce_s: float = WINDOW_S, **kw: Any) -> EventPublisher:
    store = ReplyStore(client, ttl_s=3_600)
    options: dict[str, Any] = {"events_maxlen": 1_000, "events_ttl_s": 600, **kw}
    return EventPublisher(client, RID, store=store, coalesce_s=coalesce_s, timer=timer, **options)


def stored_events(client: fakeredis.FakeRedis) -> list[StreamEvent]:
    entries = client.xrange(keys.events_stream(RID))
    return [StreamEvent.model_validate_json(fields[keys.EVENT_FIELD.encode()]) for _id, fields in entries]


def assert_contract(events: list[StreamEvent]) -> None:
    """seq strictly increasing, exactly one terminal event, and it is the last."""
    seqs = [event.seq for event in events]
    assert all(a < b for a, b in itertools.pairwise(seqs))
    assert [event.is_terminal for event in events].count(True) == 1
    assert events[-1].is_terminal


def chunk_text(events: list[StreamEvent]) -> str:
    return "".join(event.delta or "" for event in events if event.type == "chunk")


def reply() -> ChatReply:
    return ChatReply(request_id=RID, status="succeeded")


def test_off_publishes_every_chunk_at_once(fake_redis: fakeredis.FakeRedis, timer: Timer, clock: FakeClock) -> None:
    pub = publisher(fake_redis, timer, coalesce_s=0.0)
    for delta in "abc":
        pub.emit("chunk", delta=delta, provider="p", attempt=1)
    assert [event.delta for event in stored_events(fake_redis)] == ["a", "b", "c"]


def test_a_burst_goes_out_as_the_first_chunk_then_one_merged_event(
    fake_redis: fakeredis.FakeRedis, timer: Timer, clock: FakeClock
) -> None:
    pub = publisher(fake_redis, timer)
    for delta in ("He", "ll", "o ", "wo", "rld"):
        assert pub.emit("chunk", delta=delta, provider="p", attempt=1) is False
    assert [event.delta for event in stored_events(fake_redis)] == ["He"]  # the first is not delayed
    pass_time(timer, clock, WINDOW_S / 2)
    assert [event.delta for event in stored_events(fake_redis)] == ["He"]  # the rest waits for its window
    pass_time(timer, clock, WINDOW_S / 2)  # the timer publishes the rest when the window ends, unprompted
    assert [event.delta for event in stored_events(fake_redis)] == ["He", "llo world"]
    pub.finish("done", reply())
    events = stored_events(fake_redis)
    assert_contract(events)
    assert chunk_text(events) == "Hello world"


def test_the_terminal_event_flushes_the_waiting_text_first(
    fake_redis: fakeredis.FakeRedis, timer: Timer, clock: FakeClock
) -> None:
    pub = publisher(fake_redis, timer, coalesce_s=10.0)  # a window that never ends by itself here
    pub.emit("start", chain="c", worker="w")
    for delta in "abcd":
        pub.emit("chunk", delta=delta, provider="p", attempt=1)
    assert pub.finish("done", reply()) is True
    events = stored_events(fake_redis)
    assert_contract(events)
    assert [event.type for event in events] == ["start", "chunk", "done"]
    assert chunk_text(events) == "abcd"
    assert pub.next_seq == 3


def test_other_events_flush_first_and_attempts_are_never_merged(
    fake_redis: fakeredis.FakeRedis, timer: Timer, clock: FakeClock
) -> None:
    pub = publisher(fake_redis, timer, coalesce_s=10.0)
    pub.emit("start", chain="c", worker="w")
    for delta in "ab":
        pub.emit("chunk", delta=delta, provider="p", attempt=1)
    pub.emit("fallback", provider="p", attempt=1, error_type="stream_interrupted")
    for delta in "xy":
        pub.emit("chunk", delta=delta, provider="q", attempt=2)
    pub.emit("chunk", delta="z", provider="r", attempt=3)
    pub.finish("done", reply())
    events = stored_events(fake_redis)
    assert_contract(events)
    summary = [(event.type, event.delta, event.attempt) for event in events]
    assert summary == [
        ("start", None, None),
        ("chunk", "ab", 1),
        ("fallback", None, 1),
        ("chunk", "xy", 2),
        ("chunk", "z", 3),
        ("done", None, None),
    ]


def test_a_cancel_seen_by_a_background_flush_reaches_the_next_emit(
    fake_redis: fakeredis.FakeRedis, timer: Timer, clock: FakeClock
) -> None:
    pub = publisher(fake_redis, timer)
    assert pub.emit("chunk", delta="a", provider="p", attempt=1) is False
    assert pub.emit("chunk", delta="b", provider="p", attempt=1) is False  # waits for its window
    fake_redis.set(keys.cancel_key(RID), "1")
    pass_time(timer, clock, WINDOW_S)  # the timer publishes "b" and reads the cancel key
    assert pub.emit("chunk", delta="c", provider="p", attempt=1) is True
    pub.finish("cancelled", ChatReply(request_id=RID, status="cancelled"))
    events = stored_events(fake_redis)
    assert_contract(events)
    assert chunk_text(events) == "abc"


def test_a_lease_lost_during_a_background_flush_stops_the_request(
    fake_redis: fakeredis.FakeRedis, timer: Timer, clock: FakeClock
) -> None:
    fake_redis.set(keys.lease_key(RID), "w:token")  # this worker's run holds the lease
    pub = publisher(fake_redis, timer, token="w:token")
    pub.emit("chunk", delta="a", provider="p", attempt=1)
    pub.emit("chunk", delta="b", provider="p", attempt=1)
    fake_redis.set(keys.lease_key(RID), "another-worker")
    pass_time(timer, clock, WINDOW_S)
    with pytest.raises(LeaseLost):
        pub.emit("chunk", delta="c", provider="p", attempt=1)
    with pytest.raises(LeaseLost):
        pub.finish("done", reply())
    assert not [event for event in stored_events(fake_redis) if event.is_terminal]


def test_a_flush_due_while_the_request_publishes_tries_again_later(
    fake_redis: fakeredis.FakeRedis, timer: Timer, clock: FakeClock
) -> None:
    pub = publisher(fake_redis, timer)
    pub.emit("chunk", delta="a", provider="p", attempt=1)
    pub.emit("chunk", delta="b", provider="p", attempt=1)
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:  # the request's thread, in a round trip of its own
        with pub._lock:
            holding.set()
            release.wait(10.0)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(10.0)
        pass_time(timer, clock, WINDOW_S)  # the flush does not wait for the publisher
        assert [event.delta for event in stored_events(fake_redis)] == ["a"]
        assert timer.due(pub) is not None
    finally:
        release.set()
        holder.join(10.0)
    pass_time(timer, clock, WINDOW_S)
    assert [event.delta for event in stored_events(fake_redis)] == ["a", "b"]


def test_flush_publishes_the_waiting_chunk_now(fake_redis: fakeredis.FakeRedis, timer: Timer, clock: FakeClock) -> None:
    pub = publisher(fake_redis, timer, coalesce_s=10.0)
    pub.emit("chunk", delta="a", provider="p", attempt=1)
    pub.emit("chunk", delta="b", provider="p", attempt=1)
    assert pub.next_seq == 1
    assert pub.flush() is False
    assert pub.next_seq == 2
    assert [event.delta for event in stored_events(fake_redis)] == ["a", "b"]


@pytest.mark.parametrize("coalesce_ms", [0.0, 5.0])
def test_a_request_streams_the_same_text_with_coalescing_on_or_off(
    fake_redis: fakeredis.FakeRedis, coalesce_ms: float
) -> None:
    text = "Natural Language Processing, one character at a time."
    config = ScriptedConfig(text=text, chunk_size=1)
    settings = Settings(providers={"steady": config}, chains={"default": ["steady"]}, coalesce_ms=coalesce_ms)
    runtime = build_runtime(settings, fake_redis, worker_name="unit-worker")
    request = ChatRequest.model_validate({"request_id": RID, "prompt": "say it"})
    context = TaskContext(task_id=RID, queue="chat")
    session = RunSession.of(runtime, RID, timer=Timer(clock=lambda: 1_000.0, threaded=False))  # time stands still
    result = RequestRunner(runtime, request, context, session=session).run()
    assert isinstance(result, ChatReply) and result.status == "succeeded"
    events = stored_events(fake_redis)
    assert_contract(events)
    assert chunk_text(events) == text == result.replies[0].content
    chunks = [event for event in events if event.type == "chunk"]
    if coalesce_ms:
        assert [len(chunk.delta or "") for chunk in chunks] == [1, len(text) - 1]  # the first at once, then one window
    else:
        assert len(chunks) == len(text)


# The runner reads the first provider's cooldown in its first round trip (worker.state.cooldown.ReadAhead).


def test_a_first_provider_cooling_down_is_skipped_with_the_state_read_ahead(fake_redis: fakeredis.FakeRedis) -> None:
    cold = ScriptedConfig(text="never", cooldown_failures=1)
    settings = Settings(
        providers={"cold": cold, "steady": ScriptedConfig(text="warm")}, chains={"default": ["cold", "steady"]}
    )
    runtime = build_runtime(settings, fake_redis, worker_name="unit-worker")
    fake_redis.set("cascade:cooldown:cold", "1")
    request = ChatRequest.model_validate({"request_id": RID, "prompt": "say it"})
    result = RequestRunner(runtime, request, TaskContext(task_id=RID, queue="chat")).run()
    assert isinstance(result, ChatReply) and result.status == "succeeded"
    assert result.meta.provider == "steady"
    assert [(a.provider, a.outcome) for a in result.meta.attempts] == [("cold", "skipped"), ("steady", "succeeded")]


def test_the_read_ahead_answers_once_then_asks_redis(fake_redis: fakeredis.FakeRedis) -> None:
    from providers.registry import build_provider
    from worker.state.cooldown import ReadAhead, RedisCooldowns

    cold = build_provider("cold", ScriptedConfig(text="x", cooldown_failures=1))
    gate = ReadAhead(RedisCooldowns(fake_redis), "cold", cooling=False)
    fake_redis.set("cascade:cooldown:cold", "1")
    assert gate.is_cooling_down(cold) is False  # the value read ahead
    assert gate.is_cooling_down(cold) is True  # then Redis


# Groups (worker.state.coalescing): one choice's text, or one tool call's fragments, per event.


def chunk_events(client: fakeredis.FakeRedis) -> list[StreamEvent]:
    return [event for event in stored_events(client) if event.type == "chunk"]


def test_text_of_two_choices_never_merges(fake_redis: fakeredis.FakeRedis, timer: Timer, clock: FakeClock) -> None:
    pub = publisher(fake_redis, timer, coalesce_s=10.0)
    pub.emit("start", chain="c", worker="w")  # the window is open: every chunk below waits
    for piece in ("Bon", "jour", " à", " tous"):
        for index, text in ((0, piece), (1, piece.upper())):
            pub.emit("chunk", delta=text, index=index, provider="p", attempt=1)
    pub.finish("done", reply())
    events = stored_events(fake_redis)
    assert_contract(events)
    assert [(event.index, event.delta) for event in chunk_events(fake_redis)] == [
        (0, "Bonjour à tous"),
        (1, "BONJOUR À TOUS"),
    ]
    assert [event.type for event in events] == ["start", "chunk", "chunk", "done"]


def test_fragments_of_one_call_merge_keeping_its_id_and_name(
    fake_redis: fakeredis.FakeRedis, timer: Timer, clock: FakeClock
) -> None:
    pub = publisher(fake_redis, timer, coalesce_s=10.0)
    pub.emit("start", chain="c", worker="w")
    fragments = [
        {"index": 0, "id": "call_a", "name": "get_weather", "arguments_delta": ""},
        {"index": 0, "arguments_delta": '{"city": '},
        {"index": 1, "id": "call_b", "name": "get_time", "arguments_delta": "{"},
        {"index": 0, "arguments_delta": '"Paris"}'},
        {"index": 1, "arguments_delta": "}"},
    ]
    for fragment in fragments:
        pub.emit("chunk", tool_call=fragment, index=0, provider="p", attempt=1)
    pub.finish("done", reply())
    assert_contract(stored_events(fake_redis))
    merged = [event.tool_call.model_dump() for event in chunk_events(fake_redis) if event.tool_call]
    assert merged == [
        {"index": 0, "id": "call_a", "name": "get_weather", "arguments_delta": '{"city": "Paris"}'},
        {"index": 1, "id": "call_b", "name": "get_time", "arguments_delta": "{}"},
    ]
    assert all(event.delta is None for event in chunk_events(fake_redis))


def test_text_never_merges_with_a_tool_fragment(
    fake_redis: fakeredis.FakeRedis, timer: Timer, clock: FakeClock
) -> None:
    pub = publisher(fake_redis, timer, coalesce_s=10.0)
    pub.emit("start", chain="c", worker="w")
    pub.emit("chunk", delta="Let me ", index=0, provider="p", attempt=1)
    pub.emit("chunk", tool_call={"index": 0, "id": "c1", "name": "look", "arguments_delta": "{}"}, index=0,
             provider="p", attempt=1)  # fmt: skip
    pub.emit("chunk", delta="check.", index=0, provider="p", attempt=1)
    pub.flush()
    summary = [(event.delta, event.tool_call.name if event.tool_call else None) for event in chunk_events(fake_redis)]
    assert summary == [("Let me check.", None), (None, "look")]


def test_a_chunk_of_another_attempt_publishes_every_waiting_group_first(
    fake_redis: fakeredis.FakeRedis, timer: Timer, clock: FakeClock
) -> None:
    pub = publisher(fake_redis, timer, coalesce_s=10.0)
    pub.emit("start", chain="c", worker="w")
    pub.emit("chunk", delta="a", index=0, provider="p", attempt=1)
    pub.emit("chunk", delta="b", index=1, provider="p", attempt=1)
    pub.emit("chunk", delta="c", index=0, provider="q", attempt=2)
    pub.finish("done", reply())
    events = stored_events(fake_redis)
    assert_contract(events)
    assert [(e.attempt, e.index, e.delta) for e in chunk_events(fake_redis)] == [(1, 0, "a"), (1, 1, "b"), (2, 0, "c")]


def test_three_choices_past_the_budget_stay_within_maxlen(
    fake_redis: fakeredis.FakeRedis, timer: Timer, clock: FakeClock
) -> None:
    maxlen = 30
    pub = publisher(fake_redis, timer, coalesce_s=0.002, events_maxlen=maxlen)
    pub.emit("start", chain="c", worker="w")
    texts: dict[int, list[str]] = {0: [], 1: [], 2: []}
    for number in range(200):
        for index, pieces in texts.items():
            pieces.append(f"{index}:{number} ")
            pub.emit("chunk", delta=pieces[-1], index=index, provider="p", attempt=1)
        pass_time(timer, clock, 0.2)  # the windows of the slow part end between rounds
    pub.finish("done", reply())
    assert pub.next_seq <= maxlen  # every event written, not only those MAXLEN kept
    events = stored_events(fake_redis)
    assert_contract(events)
    assert [event.seq for event in events] == list(range(len(events)))  # nothing trimmed from the start
    for index, pieces in texts.items():
        assert "".join(e.delta or "" for e in events if e.type == "chunk" and e.index == index) == "".join(pieces)
