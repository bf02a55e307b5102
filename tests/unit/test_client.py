"""The producer client (tasks/producer/client.py) against fakeredis, with events written by EventPublisher."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
from kombu.utils.json import dumps as kombu_dumps

from tasks.contract import keys
from tasks.contract.schemas import (
    REQUEST_ID_HEADER,
    SUBMITTED_AT_HEADER,
    TASK_NAME,
    ChatReply,
    ChatRequest,
    StreamEvent,
)
from tasks.producer.client import (
    CANCEL_TTL_S,
    AsyncCascadeClient,
    CascadeClient,
    RequestTooLargeError,
    build_request,
    message_bytes,
)
from tests.support.recording_celery import RecordingCelery
from worker.state.publisher import EventPublisher
from worker.state.store import ReplyStore

RID = "client-1"
UNREACHABLE = "redis://127.0.0.1:1/0"  # never connected to: every test swaps in fakeredis


def publish_request(client: fakeredis.FakeRedis, request_id: str = RID, *, chunks: int = 3) -> ChatReply:
    """Write the events of a finished request, as a worker would; return its reply."""
    publisher = EventPublisher(
        client, request_id, store=ReplyStore(client, ttl_s=600), events_maxlen=1_000, events_ttl_s=600
    )
    publisher.emit("start", chain="default")
    for n in range(chunks):
        publisher.emit("chunk", delta=f"t{n} ", provider="p", attempt=1)
    reply = ChatReply(request_id=request_id, status="succeeded", metadata={"n": chunks})
    publisher.finish("done", reply)
    return reply


@pytest.fixture
def client(fake_redis: fakeredis.FakeRedis) -> Iterator[CascadeClient]:
    cascade = CascadeClient(UNREACHABLE)
    cascade.redis = fake_redis
    yield cascade


def test_events_replay_from_the_start_to_the_terminal_event(
    client: CascadeClient, fake_redis: fakeredis.FakeRedis
) -> None:
    reply = publish_request(fake_redis, chunks=4)
    seen = list(client.events(RID, timeout_s=5))
    assert [e.seq for e in seen] == list(range(6))
    assert [e.type for e in seen] == ["start", "chunk", "chunk", "chunk", "chunk", "done"]
    assert seen[-1].reply == reply


def test_events_read_in_several_batches_without_duplicates(
    client: CascadeClient, fake_redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tasks.producer.client._READ_COUNT", 2)
    publish_request(fake_redis, chunks=7)
    seqs = [e.seq for e in client.events(RID, timeout_s=5)]
    assert seqs == list(range(9))


def test_events_of_another_request_are_not_mixed_in(client: CascadeClient, fake_redis: fakeredis.FakeRedis) -> None:
    publish_request(fake_redis, "other", chunks=5)
    publish_request(fake_redis, chunks=1)
    assert {e.request_id for e in client.events(RID, timeout_s=5)} == {RID}


def test_wait_returns_the_reply(client: CascadeClient, fake_redis: fakeredis.FakeRedis) -> None:
    reply = publish_request(fake_redis)
    assert client.wait(RID, timeout_s=5) == reply
    assert client.reply(RID) == reply


def test_wait_when_the_events_expired(client: CascadeClient, fake_redis: fakeredis.FakeRedis) -> None:
    reply = publish_request(fake_redis)
    fake_redis.delete(keys.events_stream(RID))
    assert client.wait(RID, timeout_s=0.05) == reply


def test_unknown_request_times_out(client: CascadeClient) -> None:
    assert client.reply("nobody") is None
    with pytest.raises(TimeoutError):
        list(client.events("nobody", timeout_s=0.05))
    with pytest.raises(TimeoutError):
        client.wait("nobody", timeout_s=0.05)


class FinishesDuringTheBlock(fakeredis.FakeRedis):
    """The worker ends the request just after a blocking XREAD timed out with nothing new."""

    def xread(self, *args: Any, **kwargs: Any) -> Any:
        response = super().xread(*args, **kwargs)
        if not getattr(self, "finished", False):
            self.finished = True
            publish_request(self, chunks=2)
        return response


def test_the_terminal_event_is_not_lost_when_the_request_ends_during_a_read() -> None:
    cascade = CascadeClient(UNREACHABLE)
    cascade.redis = FinishesDuringTheBlock()
    seen = list(cascade.events(RID, timeout_s=0.05))
    assert [e.type for e in seen] == ["start", "chunk", "chunk", "done"]


def test_cancel_sets_the_key_with_a_ttl(client: CascadeClient, fake_redis: fakeredis.FakeRedis) -> None:
    client.cancel(RID)
    assert fake_redis.get(keys.cancel_key(RID)) == b"1"
    assert 0 < fake_redis.ttl(keys.cancel_key(RID)) <= CANCEL_TTL_S


def test_build_request_generates_an_id() -> None:
    first, second = build_request(prompt="hi"), build_request({"prompt": "hi"})
    assert first.request_id and second.request_id and first.request_id != second.request_id
    assert build_request({"prompt": "hi", "request_id": None}).request_id


def test_build_request_keeps_what_it_is_given() -> None:
    request = build_request({"prompt": "hi", "request_id": "mine"}, chain="rehearsal", stream=None)
    assert (request.request_id, request.chain, request.stream) == ("mine", "rehearsal", True)
    again = build_request(request, timeout_s=5)
    assert again.request_id == "mine" and again.timeout_s == 5
    assert again.conversation == request.conversation


def test_build_request_validates() -> None:
    with pytest.raises(ValueError):
        build_request({"prompt": "hi", "generation_kwargs": {"api_key": "sk-x"}})


def test_submit_sends_one_json_keyword_with_the_request_id_as_task_id(client: CascadeClient) -> None:
    celery = RecordingCelery()
    client._celery = celery  # type: ignore[assignment]
    request_id = client.submit(prompt="hi", chain="rehearsal", queue="chat.gpu")
    [(name, options)] = celery.sent
    assert name == TASK_NAME
    assert options["task_id"] == request_id
    assert options["queue"] == "chat.gpu"
    assert set(options["kwargs"]) == {"request"}
    sent = ChatRequest.model_validate(options["kwargs"]["request"])
    assert sent.request_id == request_id and sent.chain == "rehearsal"
    assert isinstance(options["headers"][SUBMITTED_AT_HEADER], float)
    assert options["headers"][REQUEST_ID_HEADER] == request_id
    record = client.redis.get(f"cascade:pending:{request_id}")
    assert record is not None and b'"queue": "chat.gpu"' in record, "recorded for the reapers (worker.state.pending)"


def test_an_event_stored_twice_is_yielded_once(client: CascadeClient, fake_redis: fakeredis.FakeRedis) -> None:
    publisher = EventPublisher(
        fake_redis, RID, store=ReplyStore(fake_redis, ttl_s=600), events_maxlen=1_000, events_ttl_s=600
    )
    publisher.emit("start", chain="default")
    publisher.emit("chunk", delta="once ", provider="p", attempt=1)
    [(_id, fields)] = fake_redis.xrevrange(keys.events_stream(RID), count=1)
    fake_redis.xadd(keys.events_stream(RID), fields)  # a retried write whose first reply was lost
    publisher.finish("done", ChatReply(request_id=RID, status="succeeded"))
    assert [(e.seq, e.type) for e in client.events(RID, timeout_s=5)] == [(0, "start"), (1, "chunk"), (2, "done")]


def test_async_client_replays_and_waits() -> None:
    server = fakeredis.FakeServer()
    sync_redis = fakeredis.FakeRedis(server=server)

    async def scenario() -> tuple[list[StreamEvent], ChatReply]:
        cascade = AsyncCascadeClient(UNREACHABLE)
        cascade.redis = fakeredis.FakeAsyncRedis(server=server)
        seen = [event async for event in cascade.events(RID, timeout_s=5)]
        await cascade.cancel(RID)
        return seen, await cascade.wait(RID, timeout_s=5)

    reply = publish_request(sync_redis, chunks=2)
    seen, waited = asyncio.run(scenario())
    assert [e.seq for e in seen] == [0, 1, 2, 3]
    assert waited == reply
    assert sync_redis.exists(keys.cancel_key(RID)) == 1


def test_a_request_the_workers_would_refuse_as_too_large_is_not_sent(client: CascadeClient) -> None:
    """Issue 11 item 6: three messages of 800,000 characters pass the request schema, but their
    task message is over the workers' 2,000,000-byte cap: the client refuses to send it."""
    celery = RecordingCelery()
    client._celery = celery  # type: ignore[assignment]
    messages = [{"role": "user", "content": "x" * 800_000} for _ in range(3)]
    with pytest.raises(RequestTooLargeError, match="max_message_bytes"):
        client.submit(messages=messages, request_id="too-big")
    assert celery.sent == []
    assert client.redis.exists("cascade:pending:too-big") == 0, "nothing recorded either"


def test_the_size_limit_is_the_message_body_the_worker_measures(client: CascadeClient) -> None:
    celery = RecordingCelery()
    client._celery = celery  # type: ignore[assignment]
    at_limit = {"request": build_request(prompt="y" * 100, request_id="r1").model_dump(mode="json", exclude_none=True)}
    client.max_message_bytes = message_bytes(at_limit)
    with pytest.raises(RequestTooLargeError):
        client.submit(prompt="y" * 101, request_id="r1")
    with pytest.raises(RequestTooLargeError):
        client.submit(prompt="\u00e9" * 100, request_id="r1")  # kombu's JSON escapes each: six bytes
    client.submit(prompt="y" * 100, request_id="r1")  # exactly at the limit: sent
    [(_name, options)] = celery.sent
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    assert len(kombu_dumps([[], options["kwargs"], embed]).encode()) == client.max_message_bytes, "what Celery sends"
