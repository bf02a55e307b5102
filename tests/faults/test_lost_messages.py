"""Messages lost between kombu's BRPOP and its unacked record (``worker.state.pending``), on a real
redis-server with real kombu messages sent by the producer client.

A worker killed in that instant leaves its message nowhere in Redis; the producer's pending
record is what brings it back. A request whose message is still queued, taken (unacked),
leased or answered is never resent; a lost one is resent at the second pass that finds it lost,
by exactly one of several reapers. A worker that hands a request to another queue records it
too, before it lets go of the lease, so a hand-off whose send fails is not lost either. The
worker-level proof: a request whose message vanished
before any worker took it is answered by a worker within the recovery bound.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Connection
from kombu.exceptions import OperationalError

from tasks.contract import keys
from tasks.contract.schemas import TASK_NAME, ChatRequest, HandOff
from tasks.producer.client import CascadeClient
from tasks.runner import task_message
from tests.support.sessions import opened
from worker.demo.local import LocalRedis
from worker.state import pending

from .harness import (
    FAST_RECOVERY_ENV,
    RECOVERY_BOUND_S,
    FaultWorker,
    assert_coherent,
    assert_no_secrets,
    new_id,
    stored_events,
    stored_reply,
    write_config,
)
from .report import record

pytestmark = pytest.mark.faults

QUEUE = "chat"


@pytest.fixture
def producer(server: LocalRedis) -> Iterator[CascadeClient]:
    with CascadeClient(server.url, queue=QUEUE) as client:
        yield client


class Resends:
    """A reaper's ``resend`` that only records what it was asked to send."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.tasks: list[str] = []

    def __call__(self, queue: str, kwargs: dict[str, Any], task: str) -> None:
        self.sent.append((queue, kwargs))
        self.tasks.append(task)


def sweep(rdb: redis.Redis, resend: Resends, suspects: dict[str, float]) -> list[str]:
    return pending.resend_lost(rdb, resend, older_than_s=0, suspects=suspects)


def test_the_producer_records_each_request_it_sends(rdb: redis.Redis, producer: CascadeClient) -> None:
    request_id = producer.submit(prompt="hi")
    assert rdb.zscore(pending.PENDING_SET, request_id) is not None
    record = json.loads(rdb.get(pending.record_key(request_id)) or b"{}")
    assert record["queue"] == QUEUE and set(record["kwargs"]) == {"request"}
    assert record["kwargs"]["request"]["request_id"] == request_id
    assert record["kwargs"]["request"]["messages"] == [{"role": "user", "content": "hi"}]
    assert 0 < (rdb.ttl(pending.record_key(request_id)) or 0) <= pending.PENDING_TTL_S


def test_a_message_popped_and_lost_is_resent_at_the_second_pass(rdb: redis.Redis, producer: CascadeClient) -> None:
    request_id = producer.submit(prompt="hi")
    assert rdb.brpop([QUEUE], timeout=1) is not None  # a worker took it and died before kombu recorded it
    resend, suspects = Resends(), {}
    assert sweep(rdb, resend, suspects) == [] and request_id in suspects  # once could be an instant
    assert sweep(rdb, resend, suspects) == [request_id]
    [(queue, kwargs)] = resend.sent
    assert queue == QUEUE and kwargs["request"]["request_id"] == request_id
    assert suspects == {}


def test_a_message_on_its_queue_or_taken_by_a_worker_is_left_alone(
    server: LocalRedis, rdb: redis.Redis, producer: CascadeClient
) -> None:
    taken = producer.submit(prompt="taken")
    connection = Connection(server.url)
    message = connection.default_channel.basic_get(QUEUE, no_ack=False)  # now in kombu's unacked
    assert message is not None and message.payload[1]["request"]["request_id"] == taken
    queued = producer.submit(prompt="still queued")
    resend, suspects = Resends(), {}
    for _ in range(3):
        assert sweep(rdb, resend, suspects) == []
    assert resend.sent == [] and suspects == {}
    assert {queued, taken} <= {m.decode() for m in rdb.zrange(pending.PENDING_SET, 0, -1)}
    connection.release()


def test_a_message_without_the_request_id_header_is_found_by_its_body(server: LocalRedis, rdb: redis.Redis) -> None:
    request_id = new_id("plain")
    kwargs = {"request": {"request_id": request_id, "prompt": "hi"}}
    plain = Celery("plain-producer", broker=server.url, set_as_current=False)  # no Cascade headers
    plain.conf.update(task_serializer="json")
    plain.send_task(TASK_NAME, kwargs=kwargs, task_id=new_id("task"), queue=QUEUE)
    plain.close()
    pending.note_sent(rdb, request_id, QUEUE, kwargs)
    resend, suspects = Resends(), {}
    for _ in range(3):
        assert sweep(rdb, resend, suspects) == []
    rdb.delete(QUEUE)
    assert sweep(rdb, resend, suspects) == []
    assert sweep(rdb, resend, suspects) == [request_id]


def test_a_leased_or_answered_request_is_not_resent(rdb: redis.Redis, producer: CascadeClient) -> None:
    leased = producer.submit(prompt="running")
    answered = producer.submit(prompt="done")
    rdb.delete(QUEUE)  # both taken off the queue
    rdb.set(keys.lease_key(leased), "some-worker:token", px=60_000)
    rdb.set(keys.reply_key(answered), "{}")
    resend, suspects = Resends(), {}
    for _ in range(3):
        assert sweep(rdb, resend, suspects) == []
    assert rdb.zscore(pending.PENDING_SET, answered) is None, "an answered request stops being pending"
    assert rdb.zscore(pending.PENDING_SET, leased) is not None


def test_a_request_sent_again_since_the_first_pass_is_not_resent(rdb: redis.Redis, producer: CascadeClient) -> None:
    request_id = producer.submit(prompt="hi")
    rdb.delete(QUEUE)
    resend, suspects = Resends(), {}
    assert sweep(rdb, resend, suspects) == []
    time.sleep(0.01)
    # another reaper sent it meanwhile (and its copy was taken)
    pending.note_sent(rdb, request_id, QUEUE, {"request": {"request_id": request_id, "prompt": "hi"}})
    assert sweep(rdb, resend, suspects) == []
    assert resend.sent == []


def test_of_several_reapers_exactly_one_resends(rdb: redis.Redis, producer: CascadeClient) -> None:
    request_id = producer.submit(prompt="hi")
    rdb.delete(QUEUE)
    reapers = [(Resends(), {}) for _ in range(3)]
    for resend, suspects in reapers:
        assert sweep(rdb, resend, suspects) == []
    resent = [sweep(rdb, resend, suspects) for resend, suspects in reapers]
    assert sorted(resent, key=len) == [[], [], [request_id]]


def test_a_long_queue_is_read_only_at_its_head(rdb: redis.Redis, producer: CascadeClient) -> None:
    lost = producer.submit(prompt="lost")
    rdb.delete(QUEUE)
    for _ in range(5):
        producer.submit(prompt="queued behind")
    resend, suspects = Resends(), {}
    for _ in range(3):  # the queue is longer than the scan: nothing can be called lost
        assert pending.resend_lost(rdb, resend, older_than_s=0, suspects=suspects, scan_limit=3) == []
    assert pending.resend_lost(rdb, resend, older_than_s=0, suspects=suspects, scan_limit=10) == []
    assert pending.resend_lost(rdb, resend, older_than_s=0, suspects=suspects, scan_limit=10) == [lost]


def test_a_worker_answers_a_request_whose_message_vanished(
    tmp_path_factory: pytest.TempPathFactory, server: LocalRedis, rdb: redis.Redis, producer: CascadeClient
) -> None:
    workdir = tmp_path_factory.mktemp("lost-worker")
    config = write_config(
        workdir / "cascade.toml",
        {"quick": {"type": "scripted", "text": "back from the void", "chunk_size": 5}},
        {"default": ["quick"]},
    )
    request_id = new_id("vanished")
    producer.submit(request_id=request_id, prompt="hi")
    lost_at = time.monotonic()
    assert rdb.brpop([QUEUE], timeout=1) is not None  # gone before any worker recorded it
    worker = FaultWorker("lost", server.url, config, workdir / "worker.log", env=dict(FAST_RECOVERY_ENV)).start()
    try:
        deadline = lost_at + RECOVERY_BOUND_S
        while stored_reply(rdb, request_id) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        recovered_s = time.monotonic() - lost_at
        reply = assert_coherent(stored_events(rdb, request_id), stored_reply(rdb, request_id), request_id)
        assert reply.replies[0].content == "back from the void"
        assert "its message was lost before any worker recorded it" in worker.log_text()
        assert rdb.zscore(pending.PENDING_SET, request_id) is None
        assert_no_secrets(rdb, [worker.log_path])
        record("message lost between BRPOP and unacked: answered after", f"{recovered_s:.1f} s")
    finally:
        worker.stop()


class BrokerDown:
    """A task sender whose send fails, as it does while the broker is unreachable."""

    def send(self, queue: str, kwargs: dict[str, Any], request_id: str | None = None, *, task: str = "") -> None:
        raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused. (injected)")


def test_a_hand_off_whose_send_fails_is_sent_by_a_reaper(rdb: redis.Redis) -> None:
    request = ChatRequest(request_id=new_id("handoff"), prompt="hi")
    message = task_message(request)
    state = HandOff(start_index=1, next_seq=3, queue_hops=1, deadline_at=time.time() + 60, started_at=time.time())
    session = opened(rdb, request.request_id or "", message, queue=QUEUE, worker="handoff/1", sender=BrokerDown())

    with pytest.raises(OperationalError), session:
        session.hand_off("chat.gpu", task_message(request, state))

    assert not rdb.exists(session.lease.key), "the lease went before the send"
    resend, suspects = Resends(), {}
    assert sweep(rdb, resend, suspects) == []
    assert sweep(rdb, resend, suspects) == [request.request_id]
    [(queue, kwargs)] = resend.sent
    assert queue == "chat.gpu"
    assert HandOff.model_validate(kwargs["handoff"]) == state
    assert kwargs["request"]["request_id"] == request.request_id


def test_a_request_lost_after_every_resend_is_dead_lettered(rdb: redis.Redis, producer: CascadeClient) -> None:
    request_id = producer.submit(prompt="cursed")
    given_up: list[tuple[str, dict[str, Any]]] = []
    resend, suspects = Resends(), {}

    def sweep_giving_up() -> list[str]:
        time.sleep(0.002)  # each claim stamps a new score
        return pending.resend_lost(
            rdb, resend, older_than_s=0, suspects=suspects, give_up=lambda r, rec: given_up.append((r, rec))
        )

    rdb.delete(QUEUE)
    for _ in range(pending.MAX_RESENDS):  # each resend is lost again (the fake resend sends nothing)
        assert sweep_giving_up() == []
        assert sweep_giving_up() == [request_id]
    assert sweep_giving_up() == [] and sweep_giving_up() == []
    assert [r for r, _record in given_up] == [request_id]
    assert given_up[0][1]["kwargs"]["request"]["request_id"] == request_id
    assert rdb.zscore(pending.PENDING_SET, request_id) is None and not rdb.exists(pending.record_key(request_id))
    assert len(resend.sent) == pending.MAX_RESENDS


def test_a_request_with_an_in_flight_record_is_left_to_the_lease_sweep(
    rdb: redis.Redis, producer: CascadeClient
) -> None:
    request_id = producer.submit(prompt="hi")
    rdb.delete(QUEUE)
    rdb.set(f"cascade:inflight:{request_id}", "{}")  # its lease lapsed: worker.state.reaper.reclaim_expired resends it
    resend, suspects = Resends(), {}
    for _ in range(3):
        assert sweep(rdb, resend, suspects) == []


def test_the_producer_keeps_a_record_a_worker_wrote_first(rdb: redis.Redis, producer: CascadeClient) -> None:
    request_id = new_id("raced")
    handed_on = {"request": {"request_id": request_id, "prompt": "hi"}, "handoff": {"next_seq": 3}}
    pending.note_sent(rdb, request_id, "chat.gpu", handed_on)  # a fast worker handed it on already
    producer.submit(request_id=request_id, prompt="hi")
    record = json.loads(rdb.get(pending.record_key(request_id)) or b"{}")
    assert record == {"queue": "chat.gpu", "kwargs": handed_on, "task": TASK_NAME}


def test_pending_records_are_read_past_a_page_of_running_requests(rdb: redis.Redis, producer: CascadeClient) -> None:
    running = [producer.submit(prompt=f"long {n}") for n in range(5)]
    lost = producer.submit(prompt="lost")
    rdb.delete(QUEUE)
    for request_id in running:
        rdb.set(keys.lease_key(request_id), "w:token", px=60_000)
    resend, suspects = Resends(), {}
    options: dict[str, Any] = {"older_than_s": 0, "suspects": suspects, "batch": 2, "max_batches": 4}
    assert pending.resend_lost(rdb, resend, **options) == []
    assert pending.resend_lost(rdb, resend, **options) == [lost]


def test_one_reaper_sweeps_at_a_time(rdb: redis.Redis) -> None:
    assert pending.lead_sweep(rdb, "reaper-a", hold_s=0.3)
    assert pending.lead_sweep(rdb, "reaper-a", hold_s=0.3)  # the sweeper keeps its role
    assert not pending.lead_sweep(rdb, "reaper-b", hold_s=0.3)
    time.sleep(0.4)  # reaper-a died: its role lapses
    assert pending.lead_sweep(rdb, "reaper-b", hold_s=0.3)
    assert not pending.lead_sweep(rdb, "reaper-a", hold_s=0.3)
