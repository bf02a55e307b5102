"""Poison requests (worker/state/deaths.py, worker/state/reaper.py): each run that dies with its worker
process is counted when a reaper claims it; the third death ends the request instead of a third
resume; a resumed run keeps the first run's deadline."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

import fakeredis
import pytest

from settings import Settings
from tasks.contract import keys
from tasks.contract.images import ImageReply
from tasks.contract.schemas import ChatReply, ChatRequest, StreamEvent
from tasks.runner import RequestRunner, TaskContext
from tests.support.sessions import opened
from worker.runtime import WorkerRuntime, build_runtime
from worker.state.deaths import DEATHS_TTL_S, RunEnds, carried_window
from worker.state.publisher import EventPublisher
from worker.state.reaper import reclaim_expired
from worker.state.store import ReplyStore

SettingsFactory = Callable[..., Settings]
REQUEST_ID = "poison-1"
KWARGS = {"request": {"request_id": REQUEST_ID, "prompt": "hi", "chain": "default", "metadata": {"k": "v"}}}


@pytest.fixture
def runtime(fake_redis: fakeredis.FakeRedis, make_settings: SettingsFactory) -> WorkerRuntime:
    return build_runtime(make_settings(), fake_redis, worker_name="reaper/1")


class Resends:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.tasks: list[str] = []

    def __call__(self, queue: str, kwargs: dict[str, Any], task: str) -> None:
        self.sent.append((queue, kwargs))
        self.tasks.append(task)


def run_dies(client: fakeredis.FakeRedis, window: tuple[float, float], *, chunks: int = 2) -> None:
    """A run takes the lease (recording the message and its window), streams, and dies: its
    renewals stop, the lease lapses and its in-flight entry is past due."""
    opened(client, REQUEST_ID, KWARGS, window=window, lease_ttl_s=60, record_ttl_s=600).abandon()
    publisher = EventPublisher(
        client,
        REQUEST_ID,
        store=ReplyStore(client, 60),
        events_maxlen=1000,
        events_ttl_s=60,
        next_seq=EventPublisher.resume_seq(client, REQUEST_ID),
    )
    client.delete(keys.lease_key(REQUEST_ID))  # the lease lapsed: a lease-less writer may write now
    if publisher.next_seq == 0:
        publisher.emit("start", chain="default", worker="w/1")
    attempt = 1 + sum(e.type == "fallback" for e in events(client))
    for number in range(chunks):
        publisher.emit("chunk", delta=f"c{number}", provider="steady", attempt=attempt)
    client.zadd(keys.INFLIGHT_SET, {REQUEST_ID: 0})


def events(client: fakeredis.FakeRedis) -> list[StreamEvent]:
    return [
        StreamEvent.model_validate_json(fields[b"event"])
        for _id, fields in client.xrange(keys.events_stream(REQUEST_ID))
    ]


def later() -> tuple[float, float]:
    now = time.time()
    return now, now + 300


def test_the_third_death_ends_the_request_instead_of_a_third_resume(runtime: WorkerRuntime) -> None:
    client = runtime.redis
    ends, resend = RunEnds.of(runtime), Resends()
    assert ends.max_deaths == 3

    for death in (1, 2):
        run_dies(client, later())
        assert reclaim_expired(client, resend, ends=ends) == [REQUEST_ID]
        assert int(client.hget(keys.deaths_key(REQUEST_ID), "deaths") or 0) == death
        assert resend.sent[-1] == ("chat", KWARGS), "resent as it was sent"
        # The resumed run marks the dead attempt lost, as tasks.runner does.
        EventPublisher(
            client,
            REQUEST_ID,
            store=runtime.replies,
            events_maxlen=1000,
            events_ttl_s=60,
            next_seq=EventPublisher.resume_seq(client, REQUEST_ID),
        ).emit("fallback", provider="steady", attempt=death, error_type="worker_lost")

    run_dies(client, later())
    assert reclaim_expired(client, resend, ends=ends) == []
    assert len(resend.sent) == 2, "not resent a third time"

    reply = runtime.replies.get(REQUEST_ID)
    assert reply is not None and reply.status == "failed"
    assert reply.error is not None and reply.error.type == "worker_lost" and "3 times" in reply.error.message
    assert reply.metadata == {"k": "v"} and reply.meta.chain == "default" and reply.meta.worker == "reaper/1"
    assert [(a.attempt, a.error_type) for a in reply.meta.attempts] == [(n, "worker_lost") for n in (1, 2, 3)]
    stream = events(client)
    assert [e.seq for e in stream] == list(range(len(stream)))
    assert stream[-1].type == "error" and stream[-1].reply == reply
    assert sum(e.is_terminal for e in stream) == 1
    (dead,) = [json.loads(entry) for entry in client.lrange(keys.DEAD_LETTERS, 0, -1)]
    assert (dead["reason"], dead["request_id"], dead["queue"]) == ("worker_lost", REQUEST_ID, "chat")
    assert 0 < client.ttl(keys.deaths_key(REQUEST_ID)) <= DEATHS_TTL_S

    # A later copy of the message finds the reply: the request never runs again.
    assert (
        RequestRunner(runtime, ChatRequest.model_validate(KWARGS["request"]), TaskContext(None, "chat")).run() == reply
    )


def test_the_first_runs_window_is_kept_across_deaths(runtime: WorkerRuntime) -> None:
    client, first = runtime.redis, later()
    run_dies(client, first)
    reclaim_expired(client, Resends(), ends=RunEnds.of(runtime))
    run_dies(client, (first[0] + 50, first[1] + 50))  # the resumed run's own, fresh window
    reclaim_expired(client, Resends(), ends=RunEnds.of(runtime))
    assert carried_window(client, REQUEST_ID) == first


def test_a_deadline_passed_during_resumes_ends_the_request(runtime: WorkerRuntime) -> None:
    client, resend = runtime.redis, Resends()
    now = time.time()
    run_dies(client, (now - 10, now - 1))

    assert reclaim_expired(client, resend, ends=RunEnds.of(runtime)) == []

    assert resend.sent == []
    reply = runtime.replies.get(REQUEST_ID)
    assert reply is not None and reply.error is not None and reply.error.type == "deadline_exceeded"
    assert events(client)[-1].type == "error"
    assert client.llen(keys.DEAD_LETTERS) == 0, "a request out of time is not poison"


def test_without_ends_a_reaper_only_counts_and_resends(runtime: WorkerRuntime) -> None:
    client, resend = runtime.redis, Resends()
    for _ in range(4):
        run_dies(client, later(), chunks=0)
        assert reclaim_expired(client, resend) == [REQUEST_ID]
    assert int(client.hget(keys.deaths_key(REQUEST_ID), "deaths") or 0) == 4
    assert runtime.replies.get(REQUEST_ID) is None


def test_a_resumed_run_keeps_the_first_runs_deadline(runtime: WorkerRuntime) -> None:
    """The rerun of a request whose first run died keeps that run's deadline: one that passed
    while it was being resumed stops the rerun at once, instead of a fresh deadline."""
    client = runtime.redis
    now = time.time()
    run_dies(client, (now - 10, now - 1))
    reclaim_expired(client, Resends())  # counted and resent, not ended (no ends)

    request = ChatRequest.model_validate({**KWARGS["request"], "timeout_s": 600})
    reply = RequestRunner(runtime, request, TaskContext(None, "chat")).run()

    assert isinstance(reply, ChatReply) and reply.status == "failed"
    assert reply.error is not None and reply.error.type == "deadline_exceeded"
    assert [(a.attempt, a.outcome, a.error_type) for a in reply.meta.attempts][:1] == [(1, "failed", "worker_lost")]


IMAGE_KWARGS = {"request": {"request_id": REQUEST_ID, "prompt": "a lighthouse", "chain": "images"}}


def image_run_dies(client: fakeredis.FakeRedis) -> None:
    """An image run takes the lease (its record naming cascade.image) and dies."""
    options: dict[str, Any] = {"lease_ttl_s": 60, "record_ttl_s": 600, "task": "cascade.image"}
    opened(client, REQUEST_ID, IMAGE_KWARGS, window=later(), **options).abandon()
    client.delete(keys.lease_key(REQUEST_ID))
    client.zadd(keys.INFLIGHT_SET, {REQUEST_ID: 0})


def test_a_lost_image_run_is_resent_as_cascade_image(runtime: WorkerRuntime) -> None:
    client, resend = runtime.redis, Resends()
    image_run_dies(client)
    assert reclaim_expired(client, resend, ends=RunEnds.of(runtime)) == [REQUEST_ID]
    assert resend.sent == [("chat", IMAGE_KWARGS)] and resend.tasks == ["cascade.image"]
    # What is in flight now is pending as the same task, for the lost-message sweep.
    assert json.loads(client.get(keys.pending_record(REQUEST_ID)) or b"{}")["task"] == "cascade.image"


def test_a_chat_run_is_still_resent_as_cascade_chat(runtime: WorkerRuntime) -> None:
    client, resend = runtime.redis, Resends()
    run_dies(client, later())
    assert reclaim_expired(client, resend) == [REQUEST_ID]
    assert resend.tasks == ["cascade.chat"]


def test_an_image_request_that_keeps_killing_its_worker_ends_with_an_image_reply(runtime: WorkerRuntime) -> None:
    client, resend = runtime.redis, Resends()
    image_run_dies(client)
    ends = dataclasses.replace(RunEnds.of(runtime), max_deaths=1)
    assert reclaim_expired(client, resend, ends=ends) == []
    reply = runtime.replies.get(REQUEST_ID)
    assert isinstance(reply, ImageReply) and reply.status == "failed" and reply.images == []
    assert reply.error is not None and reply.error.type == "worker_lost"
