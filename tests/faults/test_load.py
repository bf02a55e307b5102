"""Load under faults: 1,000 requests over two worker processes (two workers, ``-c 1`` each) with a
zero-delay scripted provider, while one worker is SIGKILLed (its whole process group) and
restarted three times and Redis (AOF on) is restarted once.

The first kill lands while the victim runs a request: a slow request (about 2 s, same queue) is
sent until one starts on the victim, which is killed mid-stream, so the lease, the reaper and the
``worker_lost`` resume are exercised under load. The other two land at a random moment while
requests flow; such a kill can also land between kombu's BRPOP taking a message off the queue
and kombu recording it as unacknowledged, where only the producer's pending record
(``worker.state.pending``) still knows of the message.

Every request ends with exactly one stored reply and its stream with exactly one terminal event
(seq 0..n, no gap, the terminal event carrying the stored reply): 0 lost, 0 duplicated. Writes
of reply keys are also counted through keyspace notifications (a reply overwritten would show
as a second write). The surviving worker's pool process must not grow: its RSS at the end may
exceed its RSS after warm-up by at most ``RSS_GROWTH_LIMIT`` (30 MiB).

The figures of the run are printed as the suite's last lines and written to
``build/faults-load-figures.txt`` (``CASCADE_FAULTS_REPORT``).
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import redis
from kombu.exceptions import OperationalError

from tasks.contract import keys
from tasks.contract.schemas import ChatReply, StreamEvent
from tasks.producer.client import CascadeClient
from tests.support.redis_server import RedisServer
from tests.support.stored import parse_events
from tests.support.stream_contract import contract_breach

from .harness import (
    FAST_RECOVERY_ENV,
    REDIS_PASSWORD,
    FaultWorker,
    ReplyWrites,
    assert_no_secrets,
    rss_bytes,
    wait_until,
    write_config,
)
from .report import record_load

pytestmark = pytest.mark.faults

REQUESTS = 1_000
KILLS = 3
# The fault schedule, by how many requests were submitted: kill mid-request, kill at a random
# moment, restart Redis, kill at a random moment.
KILL_AT = (150, 420, 780)
KILL_MID_REQUEST_AT = 150
REDIS_RESTART_AT = 600
SUBMIT_RATE_PER_S = 70.0  # paced, so the faults land while requests flow
WARM_UP = 40
ALL_ANSWERED_TIMEOUT_S = 120.0
RSS_GROWTH_LIMIT = 30 * 1024 * 1024
TEXT = "Zero-delay scripted answer, chunked into eight-char pieces."
SLOW_TEXT = " ".join(f"slow{i:02d}" for i in range(20))
PROVIDERS = {
    "instant": {"type": "scripted", "text": TEXT, "chunk_size": 8, "chunk_delay_ms": 0},
    # About 2 s: the request the victim is killed in the middle of.
    "slow": {"type": "scripted", "text": SLOW_TEXT, "chunk_size": 7, "chunk_delay_ms": 100},
}
CHAINS = {"default": ["instant"], "slow": ["slow"]}


@dataclass
class LoadRun:
    server: RedisServer
    victim: FaultWorker
    survivor: FaultWorker
    rdb: redis.Redis
    submitted: list[str] = field(default_factory=list)
    slow: list[str] = field(default_factory=list)
    submit_retries: int = 0
    kills: int = 0
    redis_restarts: int = 0
    peak_rss: int = 0
    error: BaseException | None = None


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoadRun]:
    workdir = tmp_path_factory.mktemp("load")
    config = write_config(workdir / "cascade.toml", PROVIDERS, CHAINS)
    server = RedisServer(
        workdir / "redis", password=REDIS_PASSWORD, appendonly=True, extra_args=["--notify-keyspace-events", "K$"]
    ).start()
    victim, survivor = (
        FaultWorker(name, server.url, config, workdir / f"worker-{name}.log", env=dict(FAST_RECOVERY_ENV))
        for name in ("victim", "survivor")
    )
    rdb = redis.Redis.from_url(server.url)
    try:
        for started in (victim, survivor):
            started.launch()
        for started in (victim, survivor):
            started.wait_ready()
        yield LoadRun(server, victim, survivor, rdb)
    finally:
        victim.stop()
        survivor.stop()
        rdb.close()
        server.stop()


def submit_all(load: LoadRun, client: CascadeClient, stop: threading.Event) -> None:
    """The producer: REQUESTS requests at SUBMIT_RATE_PER_S; a submit that fails while Redis
    restarts is sent again (same request id: at most one of the copies runs)."""
    started = time.monotonic()
    try:
        for number in range(REQUESTS):
            request_id = f"load-{number:04d}"
            pause = started + number / SUBMIT_RATE_PER_S - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            give_up = time.monotonic() + 30
            while True:
                try:
                    client.submit(request_id=request_id, prompt=f"request {number}")
                    break
                except (OperationalError, redis.RedisError):
                    load.submit_retries += 1
                    if stop.is_set() or time.monotonic() > give_up:
                        raise
                    time.sleep(0.1)
            load.submitted.append(request_id)
    except BaseException as exc:
        load.error = exc


def kill_mid_request(load: LoadRun, client: CascadeClient) -> None:
    """Send slow requests until one runs on the victim; SIGKILL the victim's process group
    while that request streams."""
    for attempt in range(10):
        request_id = f"slow-{load.kills}-{attempt}"
        client.submit(request_id=request_id, prompt="Take your time.", chain="slow")
        load.slow.append(request_id)
        stream = keys.events_stream(request_id)
        wait_until(lambda: load.rdb.xlen(stream) >= 3, timeout_s=30, what=f"{request_id} streams")  # noqa: B023
        [start] = parse_events(load.rdb.xrange(stream, count=1))
        if load.victim.runs(start.worker):
            load.victim.kill_group()
            load.kills += 1
            return
    raise AssertionError("no slow request ran on the victim in 10 tries")


def sample_rss(load: LoadRun, stop: threading.Event) -> None:
    """Track the peak RSS of every worker process (main and pool) while the run lasts."""
    while not stop.wait(0.2):
        for started in (load.victim, load.survivor):
            for pid in [started.pid, *started.pool_pids()] if started.alive() else []:
                try:
                    load.peak_rss = max(load.peak_rss, rss_bytes(pid))
                except (ProcessLookupError, FileNotFoundError):
                    pass


def read_back(rdb: redis.Redis, request_ids: list[str]) -> tuple[dict[str, ChatReply], dict[str, list[StreamEvent]]]:
    """Every stored reply and event stream, in pipelined batches."""
    replies: dict[str, ChatReply] = {}
    streams: dict[str, list[StreamEvent]] = {}
    for first in range(0, len(request_ids), 100):
        batch = request_ids[first : first + 100]
        pipe = rdb.pipeline(transaction=False)
        for request_id in batch:
            pipe.get(keys.reply_key(request_id))
            pipe.xrange(keys.events_stream(request_id))
        results = pipe.execute()
        for index, request_id in enumerate(batch):
            raw, entries = results[2 * index], results[2 * index + 1]
            if raw:
                replies[request_id] = ChatReply.model_validate_json(raw)
            streams[request_id] = parse_events(entries)
    return replies, streams


def whereabouts(rdb: redis.Redis, request_id: str) -> dict[str, object]:
    """Where a lost request's traces are: for the failure message."""
    in_queue = sum(request_id.encode() in item for item in rdb.lrange("chat", 0, -1))
    in_unacked = sum(request_id.encode() in item for item in rdb.hvals("unacked"))
    return {
        "request_id": request_id,
        "queued": in_queue,
        "unacked": in_unacked,
        "events": rdb.xlen(keys.events_stream(request_id)),
        "lease": rdb.exists(f"cascade:lease:{request_id}"),
        "inflight": rdb.exists(f"cascade:inflight:{request_id}"),
    }


@pytest.mark.timeout(300)
def test_a_thousand_requests_through_kills_and_a_redis_restart(run: LoadRun) -> None:
    load = run
    started = time.monotonic()
    writes = ReplyWrites(load.rdb)
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(CascadeClient(load.server.url))
        warm = [client.submit(prompt="warm up") for _ in range(WARM_UP)]
        for request_id in warm:
            client.wait(request_id, timeout_s=30)
        survivor_child = load.survivor.pool_pids()[0]
        rss_start = rss_bytes(survivor_child)

        side = stack.enter_context(CascadeClient(load.server.url))  # slow requests, from this thread
        stop = threading.Event()
        producer = threading.Thread(target=submit_all, args=(load, client, stop), daemon=True)
        sampler = threading.Thread(target=sample_rss, args=(load, stop), daemon=True)
        producer.start()
        sampler.start()
        try:
            for at in sorted([*KILL_AT, REDIS_RESTART_AT]):
                wait_until(
                    lambda at=at: len(load.submitted) >= at or load.error is not None or not producer.is_alive(),
                    timeout_s=60,
                    what=f"{at} requests submitted",
                )
                assert load.error is None, load.error
                if at == REDIS_RESTART_AT:
                    writes.drain(settle_s=0.0)
                    load.server.restart()
                    writes.resubscribe()
                    load.redis_restarts += 1
                elif at == KILL_MID_REQUEST_AT:
                    kill_mid_request(load, side)
                    load.victim.start()
                else:
                    time.sleep(random.uniform(0, 0.05))
                    load.victim.kill_group()
                    load.kills += 1
                    load.victim.start()
            producer.join(timeout=60)
            assert not producer.is_alive() and load.error is None, load.error
            assert len(load.submitted) == REQUESTS

            def answered() -> bool:
                pipe = load.rdb.pipeline(transaction=False)
                for request_id in load.submitted + load.slow:
                    pipe.exists(keys.reply_key(request_id))
                return all(pipe.execute())

            try:
                wait_until(answered, timeout_s=ALL_ANSWERED_TIMEOUT_S, interval_s=0.5, what="every request answered")
            except TimeoutError:
                pass  # counted as lost below
            finally:
                writes.drain()
        finally:
            stop.set()
            sampler.join(timeout=5)
        rss_end = rss_bytes(survivor_child)
    wall_s = time.monotonic() - started

    everything = load.submitted + load.slow
    replies, streams = read_back(load.rdb, everything)
    lost = [request_id for request_id in everything if request_id not in replies]
    broken = [r for r in everything if r in replies and contract_breach(streams[r], r, reply=replies[r])]
    overwritten = {key: ops for key, ops in writes.drain().items() if ops.count("set") > 1}
    writes.close()
    duplicated = len({r for r in broken if sum(e.is_terminal for e in streams[r]) > 1} | set(overwritten))
    failed = [r for r, reply in replies.items() if reply.status != "succeeded"]
    resumed = sum(any(e.type == "fallback" for e in streams[r]) for r in replies)
    growth = rss_end - rss_start
    mib = 1024 * 1024
    logs = load.victim.log_text() + load.survivor.log_text()
    observed_sets = sum(ops.count("set") for key, ops in writes.writes.items() if key.split(":")[-1] in everything)
    figures = {
        "requests": f"{REQUESTS} zero-delay + {len(load.slow)} slow (to kill the victim mid-request)",
        "answered": str(len(replies)),
        "lost": str(len(lost)),
        "duplicated": str(duplicated),
        "failed replies": str(len(failed)),
        "resumed after a lost worker (worker_lost)": str(resumed),
        "resent by a reaper (lease lapsed)": str(logs.count("lost its worker; sending it")),
        "put back by a reaper (taken, never started)": str(logs.count("its worker died before starting it")),
        "resent by a reaper (lost between BRPOP and unacked)": str(logs.count("before any worker recorded it")),
        "reply writes seen by keyspace notifications": f"{observed_sets} of {len(replies)} replies",
        "worker kills survived (SIGKILL, process group)": str(load.kills),
        "redis restarts (AOF)": str(load.redis_restarts),
        "submits retried while Redis restarted": str(load.submit_retries),
        "surviving pool process RSS start -> end": f"{rss_start / mib:.1f} -> {rss_end / mib:.1f} MiB "
        f"({growth / mib:+.1f} MiB)",
        "peak RSS of any worker process": f"{load.peak_rss / mib:.1f} MiB",
        "wall time": f"{wall_s:.1f} s",
    }
    record_load(figures)

    assert load.kills == KILLS and load.redis_restarts == 1
    assert load.survivor.pool_pids() == [survivor_child], "the surviving worker's pool process lived throughout"
    assert not lost, f"{len(lost)} lost: {[whereabouts(load.rdb, r) for r in lost[:5]]}"
    assert not broken, f"{len(broken)} streams not one coherent answer, e.g. {broken[:5]}: " + str(
        [contract_breach(streams[r], r, reply=replies[r]) for r in broken[:3]]
    )
    assert not overwritten, f"replies written twice: {list(overwritten)[:5]}"
    assert not failed, f"{len(failed)} failed, e.g. {[replies[r].error for r in failed[:3]]}"
    assert all(replies[r].replies[0].content == TEXT for r in load.submitted)
    assert all(replies[r].replies[0].content == SLOW_TEXT for r in load.slow)
    killed = [r for r in load.slow if any(e.type == "fallback" for e in streams[r])]
    assert len(killed) == 1, "the mid-request kill voided the slow request's attempt (worker_lost); it resumed"
    assert growth < RSS_GROWTH_LIMIT, f"the surviving pool process grew by {growth / mib:.1f} MiB"


def test_no_secret_in_anything_the_load_run_produced(run: LoadRun) -> None:
    assert_no_secrets(run.rdb, [run.victim.log_path, run.survivor.log_path])
