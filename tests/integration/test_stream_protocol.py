"""The stream protocol as a subscriber sees it: event order, the pub/sub channel, late and
mid-stream subscribers, the asyncio client, ``stream = false``, cancellation and TTLs."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
import redis

from tasks.contract import keys
from tasks.contract.schemas import ChatReply, StreamEvent
from tasks.producer.client import AsyncCascadeClient, CascadeClient

from .harness import (
    REQUEST_TIMEOUT_S,
    assert_well_formed,
    follow,
    new_id,
    published_events,
    reconstruct_text,
    run_request,
    stored_events,
    stored_reply,
    wait_for_subscription,
    wait_until,
)
from .scenarios import DRIBBLE_TEXT, STEADY_TEXT

pytestmark = pytest.mark.integration

DAY_S = 86_400


def test_events_are_ordered_and_done_carries_the_stored_reply(client: CascadeClient) -> None:
    outcome = run_request(client, prompt="hello", chain="default", metadata={"ticket": "T-1", "n": 3})
    events, reply = outcome.events, outcome.reply
    n_chunks = math.ceil(len(STEADY_TEXT) / 4)

    assert outcome.types() == ["start"] + ["chunk"] * n_chunks + ["done"]
    start = events[0]
    assert start.seq == 0
    assert start.chain == "default"
    assert start.worker
    assert all(e.v == 1 for e in events)
    assert all(e.ts is not None for e in events)
    assert all(e.provider == "steady" and e.attempt == 1 for e in outcome.of_type("chunk"))

    assert reply.status == "succeeded"
    assert reply.error is None
    assert reply.metadata == {"ticket": "T-1", "n": 3}
    assert reply.meta.chain == "default"
    assert reply.meta.worker
    assert reply.meta.timings.total_ms is not None
    assert reply.meta.timings.queued_ms is not None
    assert reply.meta.timings.ttft_ms is not None
    [answer] = reply.replies
    assert answer.role == "assistant"
    assert answer.content == STEADY_TEXT == reconstruct_text(events)
    assert answer.meta.model == "scripted"
    assert answer.meta.finish_reason == "stop"
    assert answer.meta.usage.completion_tokens == n_chunks
    assert answer.meta.usage.total_tokens == answer.meta.usage.prompt_tokens + n_chunks
    # wait() and reply() agree with the terminal event.
    assert client.wait(outcome.request_id, timeout_s=5) == reply
    assert client.reply(outcome.request_id) == reply


def test_pubsub_channel_carries_the_same_events(client: CascadeClient) -> None:
    request_id = new_id()
    pubsub = client.redis.pubsub()
    try:
        pubsub.subscribe(keys.stream_channel(request_id))
        wait_for_subscription(pubsub)
        client.submit(request_id=request_id, prompt="hello", chain="default")

        live = published_events(pubsub, until_terminal_s=REQUEST_TIMEOUT_S, poll_s=0.5)
    finally:
        pubsub.close()

    assert_well_formed(live, request_id)
    assert live == stored_events(client.redis, request_id)
    assert live[-1].reply == stored_reply(client.redis, request_id)


def test_late_subscriber_replays_from_the_start(client: CascadeClient) -> None:
    request_id = client.submit(prompt="hello", chain="default")
    reply = client.wait(request_id, timeout_s=REQUEST_TIMEOUT_S)

    # Start following only now, twice: the same complete stream each time.
    first = follow(client, request_id)
    second = follow(client, request_id)
    assert first.events == second.events == stored_events(client.redis, request_id)
    assert first.reply == reply
    assert reconstruct_text(first.events) == STEADY_TEXT


def test_subscriber_joining_mid_stream_gets_no_gap_and_no_duplicate(client: CascadeClient) -> None:
    request_id = client.submit(prompt="hello", chain="dribble")
    stream = keys.events_stream(request_id)
    # Join once a few events were published, while the request is still running.
    wait_until(lambda: client.redis.xlen(stream) >= 4, timeout_s=REQUEST_TIMEOUT_S, what="first events")
    assert client.reply(request_id) is None, "the request finished before the subscriber joined"
    seen_at_join = client.redis.xlen(stream)

    outcome = follow(client, request_id)

    assert len(outcome.events) > seen_at_join  # it went on following live
    assert outcome.events == stored_events(client.redis, request_id)
    assert len({e.seq for e in outcome.events}) == len(outcome.events)
    assert outcome.types()[-1] == "done"
    assert reconstruct_text(outcome.events) == DRIBBLE_TEXT == outcome.reply.replies[0].content


def test_async_client_submits_follows_and_waits(redis_url: str, client: CascadeClient) -> None:
    async def scenario() -> tuple[str, list[StreamEvent], ChatReply, ChatReply | None]:
        async with AsyncCascadeClient(redis_url) as aclient:
            request_id = await aclient.submit(prompt="hello", chain="default")
            events = [event async for event in aclient.events(request_id, timeout_s=REQUEST_TIMEOUT_S)]
            reply = await aclient.wait(request_id, timeout_s=REQUEST_TIMEOUT_S)
            return request_id, events, reply, await aclient.reply(request_id)

    request_id, events, reply, stored = asyncio.run(scenario())

    assert_well_formed(events, request_id)
    assert events == stored_events(client.redis, request_id)
    assert events[-1].type == "done"
    assert reply == stored == events[-1].reply
    assert reply.status == "succeeded"
    assert reply.replies[0].content == STEADY_TEXT == reconstruct_text(events)


def test_stream_false_gives_start_and_done_with_the_full_reply(client: CascadeClient) -> None:
    outcome = run_request(client, prompt="hello", chain="default", stream=False)

    assert outcome.types() == ["start", "done"]
    assert outcome.reply.status == "succeeded"
    assert outcome.reply.replies[0].content == STEADY_TEXT
    assert outcome.reply.meta.attempts[0].chunks == math.ceil(len(STEADY_TEXT) / 4)


def test_cancel_stops_the_request_at_the_next_chunk(client: CascadeClient) -> None:
    request_id = client.submit(prompt="hello", chain="dribble")
    events: list[StreamEvent] = []
    cancelled = False
    for event in client.events(request_id, timeout_s=REQUEST_TIMEOUT_S):
        events.append(event)
        if event.type == "chunk" and not cancelled:
            client.cancel(request_id)
            cancelled = True
    reply = stored_reply(client.redis, request_id)

    assert_well_formed(events, request_id)
    assert events[-1].type == "cancelled"
    assert reply is not None
    assert events[-1].reply == reply
    assert reply.status == "cancelled"
    assert reply.error is not None
    assert reply.error.type == "cancelled"
    assert reply.replies == []
    total_chunks = math.ceil(len(DRIBBLE_TEXT) / 2)
    chunks = [e for e in events if e.type == "chunk"]
    assert 1 <= len(chunks) < total_chunks
    assert DRIBBLE_TEXT.startswith(reconstruct_text(events))
    assert [e for e in events if e.type == "fallback"] == []
    assert [(a.provider, a.outcome, a.error_type) for a in reply.meta.attempts] == [("dribble", "stopped", "cancelled")]


def test_cancel_before_the_worker_starts_runs_no_provider(client: CascadeClient) -> None:
    request_id = new_id()
    client.cancel(request_id)
    client.submit(request_id=request_id, prompt="hello", chain="default")
    outcome = follow(client, request_id)

    assert outcome.types() == ["start", "cancelled"]
    assert outcome.reply.status == "cancelled"
    assert outcome.reply.meta.attempts == []


def test_reply_and_events_have_a_ttl(client: CascadeClient, rdb: redis.Redis) -> None:
    outcome = run_request(client, prompt="hello", chain="default")

    reply_ttl = rdb.ttl(keys.reply_key(outcome.request_id))
    events_ttl = rdb.ttl(keys.events_stream(outcome.request_id))
    assert DAY_S - 300 <= reply_ttl <= DAY_S
    assert 0 < events_ttl <= DAY_S
    # The stored reply is plain JSON that validates against the public schema.
    raw = rdb.get(keys.reply_key(outcome.request_id))
    assert raw is not None
    assert ChatReply.model_validate(json.loads(raw)) == outcome.reply
