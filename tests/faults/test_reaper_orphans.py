"""The reaper's orphan sweep (``worker.state.reaper.restore_orphans``) on a real redis-server and real
kombu messages: a message a worker took (kombu's unacked entry) and never started goes back to
its queue; one whose request started, is leased, answered, too young, or not ``cascade.chat``
stays where it is. (The worker-level proof is in test_worker_loss.py.)"""

from __future__ import annotations

from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Connection

from tasks.contract import keys
from tasks.contract.schemas import TASK_NAME
from tests.support.redis_server import RedisServer
from worker.state.reaper import restore_orphans

from .harness import new_id

pytestmark = pytest.mark.faults

QUEUE = "chat"


def take(url: str, kwargs: dict[str, Any], task: str = TASK_NAME) -> Any:
    """Send a task message and take it off the queue as a worker does, without acking it: what a
    worker that died before starting the task leaves behind."""
    producer = Celery("orphan-producer", broker=url, set_as_current=False)
    producer.conf.update(task_serializer="json")
    producer.send_task(task, kwargs=kwargs, task_id=new_id("task"), queue=QUEUE)
    producer.close()
    connection = Connection(url)
    message = connection.default_channel.basic_get(QUEUE, no_ack=False)
    assert message is not None
    return connection  # left open: closing the channel would put the message back itself


def test_an_unstarted_message_goes_back_to_its_queue(server: RedisServer, rdb: redis.Redis) -> None:
    request_id = new_id("orphan")
    connection = take(server.url, {"request": {"request_id": request_id, "prompt": "hi"}})
    assert rdb.hlen(keys.UNACKED) == 1 and rdb.llen(QUEUE) == 0

    assert restore_orphans(rdb, orphan_after_s=0) == [request_id]
    assert rdb.hlen(keys.UNACKED) == 0 and rdb.llen(QUEUE) == 1
    again = Connection(server.url).default_channel.basic_get(QUEUE, no_ack=True)
    assert again.payload[1]["request"]["request_id"] == request_id
    assert again.headers["redelivered"] is True
    assert restore_orphans(rdb, orphan_after_s=0) == []  # once
    connection.release()


def test_the_task_id_stands_in_for_a_missing_request_id(server: RedisServer, rdb: redis.Redis) -> None:
    connection = take(server.url, {"request": '{"prompt": "hi"}'})  # JSON text, no request_id
    [restored] = restore_orphans(rdb, orphan_after_s=0)
    assert restored.startswith("task-")
    connection.release()


@pytest.mark.parametrize("state", ["started", "leased", "answered", "in_flight", "young", "other_task", "hand_off_ran"])
def test_a_message_whose_request_is_not_an_orphan_stays(server: RedisServer, rdb: redis.Redis, state: str) -> None:
    request_id = new_id(state)
    kwargs: dict[str, Any] = {"request": {"request_id": request_id, "prompt": "hi"}}
    if state == "hand_off_ran":
        kwargs["handoff"] = {"start_index": 1, "next_seq": 1, "queue_hops": 1, "deadline_at": 0, "started_at": 0}
    connection = take(server.url, kwargs, task="other.task" if state == "other_task" else TASK_NAME)
    event = '{{"v":1,"type":"start","request_id":"{}","seq":{}}}'
    if state in ("started", "hand_off_ran"):
        for seq in range(2):  # a hand-off sent at seq 1 whose next queue already published seq 1
            rdb.xadd(keys.events_stream(request_id), {keys.EVENT_FIELD: event.format(request_id, seq)})
    existing = {"leased": keys.lease_key(request_id), "answered": keys.reply_key(request_id)}
    existing["in_flight"] = f"cascade:inflight:{request_id}"
    if state in existing:
        rdb.set(existing[state], "x")

    assert restore_orphans(rdb, orphan_after_s=3600 if state == "young" else 0) == []
    assert rdb.hlen(keys.UNACKED) == 1 and rdb.llen(QUEUE) == 0
    connection.release()


def test_a_hand_off_that_never_started_on_its_next_queue_goes_back(server: RedisServer, rdb: redis.Redis) -> None:
    request_id = new_id("handoff")
    handoff = {"start_index": 1, "next_seq": 2, "queue_hops": 1, "deadline_at": 0, "started_at": 0}
    connection = take(server.url, {"request": {"request_id": request_id, "prompt": "hi"}, "handoff": handoff})
    for seq in range(2):  # what the first queue published before handing off
        event = f'{{"v":1,"type":"start","request_id":"{request_id}","seq":{seq}}}'
        rdb.xadd(keys.events_stream(request_id), {keys.EVENT_FIELD: event})
    assert restore_orphans(rdb, orphan_after_s=0) == [request_id]
    connection.release()
