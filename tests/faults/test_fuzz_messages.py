"""Hostile messages, fuzzed at the queue: a few thousand generated entries LPUSHed straight on
the ``chat`` list of a real redis-server (raw text and bytes, JSON of the wrong shape, every
header with values of the wrong type, envelope fields of the wrong kind, bodies in the wrong
encoding or of the wrong shape, huge headers, over-size bodies, Celery options, requests that
fail validation), interleaved with valid requests, against one real worker.

It passes when the worker — the same process — is alive at the end, every valid request was
answered exactly once, and every hostile entry left exactly one entry in ``cascade:dead`` with
a reason (each hostile entry carries a unique marker its dead letter shows).

``CASCADE_FUZZ_MESSAGES`` sets the number of hostile entries (seeded: the same run each time).
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from tasks.contract import keys
from tasks.contract.schemas import REQUEST_ID_HEADER, SUBMITTED_AT_HEADER, TASK_NAME
from tests.support.redis_server import RedisServer

from .harness import FaultWorker, ReplyWrites, dead_letters, running_worker, stored_events, stored_reply, wait_until

pytestmark = pytest.mark.faults

HOSTILE = int(os.environ.get("CASCADE_FUZZ_MESSAGES", "4000"))
VALID_EVERY = 10  # one valid request after every this many hostile entries
SEED = 11
MAX_MESSAGE_BYTES = 20_000  # the worker's cap, small so that over-size bodies are cheap
TEXT = "Fuzzed, still serving."
REASONS = {
    "undecodable",
    "content_disallowed",
    "unknown_message",
    "unknown_task",
    "invalid_task",
    "unsupported_option",
    "request_too_large",
    "invalid_request",
    "unknown_chain",
}
MARKER = re.compile(r"hz\d{5}z")
DRAIN_TIMEOUT_S = 90.0


@dataclass
class Target:
    rdb: redis.Redis
    worker: FaultWorker
    writes: ReplyWrites


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory, server: RedisServer) -> Iterator[Target]:
    workdir = tmp_path_factory.mktemp("fuzz-messages")
    providers = {"steady": {"type": "scripted", "text": TEXT, "chunk_size": 8}}
    env = {
        "CASCADE_MAX_MESSAGE_BYTES": str(MAX_MESSAGE_BYTES),
        "CASCADE_DEAD_LETTER_MAXLEN": str(HOSTILE * 2),  # none trimmed: each is counted
        "CASCADE_COALESCE_MS": "0",
    }
    rdb = redis.Redis.from_url(server.url)
    rdb.flushall()
    writes = ReplyWrites(rdb)
    try:
        with running_worker(workdir, server.url, providers, {"default": ["steady"]}, name="fuzz", env=env) as worker:
            yield Target(rdb, worker, writes)
    finally:
        writes.close()
        rdb.close()


# --- what is pushed -----------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def body_of(request: dict[str, Any], embed: Any = None) -> bytes:
    canvas = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    return json.dumps([[], {"request": request}, canvas if embed is None else embed]).encode()


def envelope(ident: str, request: dict[str, Any], *, header_id: bool = True) -> dict[str, Any]:
    """A valid entry as Celery's producer writes it; ``m`` first, so a raw preview shows it."""
    headers: dict[str, Any] = {
        "lang": "py",
        "task": TASK_NAME,
        "id": ident,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": ident,
        "parent_id": None,
        "argsrepr": "()",
        "kwargsrepr": "{...}",
        "origin": "fuzz@test",
        "ignore_result": False,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
        SUBMITTED_AT_HEADER: time.time(),
    }
    if header_id:
        headers[REQUEST_ID_HEADER] = ident
    return {
        "m": ident,
        "body": b64(body_of(request)),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            "correlation_id": ident,
            "reply_to": "fuzz-reply",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": "chat"},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": f"tag-{ident}",
        },
    }


WRONG_VALUES: list[Any] = [7, -1, 3.5, True, [], ["cascade.chat"], {"a": 1}, {}, "x" * 9_000]
TEXT_HEADERS = ("lang", "shadow", "root_id", "parent_id", "argsrepr", "kwargsrepr", "origin")
REFUSED_HEADERS = ("eta", "expires", "countdown", "compression", "group", "group_index", "chord", "chain")
REFUSED_HEADERS += ("callbacks", "errbacks", "link", "link_error", "soft_time_limit", "time_limit")
RESERVED_HEADERS = ("is_eager", "delivery_info", "hostname", "reply_to", "args", "kwargs", "headers", "utc")


def hostile_header(rng: random.Random, entry: dict[str, Any]) -> None:
    """One header set to a value the screen must refuse."""
    headers = entry["headers"]
    kind = rng.randrange(10)
    if kind == 0:
        headers["task"] = rng.choice([7, None, ["cascade.chat"], {"n": 1}, "", "celery.chord_unlock", "cascade.x"])
    elif kind == 1:
        choice = rng.choice([7, None, ["x"], "", "x" * 300, "tab\tid"])
        if choice is None:
            del headers["id"]
        else:
            headers["id"] = choice
    elif kind == 2:
        headers[rng.choice(TEXT_HEADERS)] = rng.choice([7, 3.5, True, [], {"a": 1}, "x" * 9_000])
    elif kind == 3:
        headers[rng.choice(("retries", "replaced_task_nesting"))] = rng.choice(["3", 3.5, True, -1, []])
    elif kind == 4:
        headers[rng.choice(("ignore_result", "redelivered"))] = rng.choice(["yes", 1, 0, [], {}])
    elif kind == 5:
        headers[REQUEST_ID_HEADER] = rng.choice(["a b", "x:y", 5, ["id"], "x" * 200, ""])
    elif kind == 6:
        headers[rng.choice(REFUSED_HEADERS)] = rng.choice([*WRONG_VALUES, "2000-01-01T00:00:00", "zlib", 60])
    elif kind == 7:
        headers["timelimit"] = rng.choice([[1, 1], [None, 5], "soon", 10, [None], {}])
    elif kind == 8:
        headers[rng.choice((*RESERVED_HEADERS, "_x", "has space", ""))] = rng.choice([True, "x", 1])
    else:
        many = rng.choice([1, 6])
        for n in range(many):
            headers[f"x-big-{n}"] = "y" * (9_000 if many == 1 else 7_000)
        if rng.random() < 0.3:
            headers["x-nested"] = {"deep": [1, 2, {"x": None}]}
    if SUBMITTED_AT_HEADER in headers and kind == 3 and rng.random() < 0.3:
        headers[SUBMITTED_AT_HEADER] = rng.choice(["now", True, [1]])


def hostile_envelope_field(rng: random.Random, entry: dict[str, Any], marker: str) -> None:
    """One envelope field of the wrong kind, or a body in the wrong encoding or shape."""
    request = {"request_id": marker, "prompt": marker}
    kind = rng.randrange(12)
    if kind == 0:
        entry["content-type"] = rng.choice(["application/x-python-serialize", "text/plain", None, 5, ""])
    elif kind == 1:
        entry["content-encoding"] = rng.choice(["binary", "latin-1", None, 5])
    elif kind == 2:
        entry["properties"]["body_encoding"] = rng.choice(["utf-8", None, 1, "base32"])
    elif kind == 3:
        properties = entry["properties"]
        field = rng.choice(["delivery_tag", "delivery_info", "priority", "correlation_id", "whole"])
        if field == "whole":
            entry["properties"] = rng.choice([None, [], "p", 1])
        elif field == "delivery_info":
            properties[field] = rng.choice([None, [], {"exchange": ""}, {"exchange": 1, "routing_key": "chat"}])
        elif field == "priority":
            properties[field] = rng.choice(["high", -1, 300, 2.5, True])
        elif field == "correlation_id":
            properties[field] = rng.choice([1, [], "c" * 300])
        else:
            properties[field] = rng.choice([None, 5, "", "t" * 300])
    elif kind == 4:
        entry["body"] = rng.choice([None, 5, [1], {"a": 1}])
    elif kind == 5:
        entry["body"] = rng.choice(["!!" + marker + "!!", marker + "=", b64(body_of(request))[:-3] + "*"])
    elif kind == 6:
        entry["body"] = b64(b"\xff\xfe" + marker.encode() + bytes(rng.randrange(256) for _ in range(20)))
    elif kind == 7:
        raw = rng.choice([f"{marker} not json {{", f'{{"{marker}": 1}}', f'["{marker}", 1]', f'"{marker}"'])
        entry["body"] = b64(raw.encode())
    elif kind == 8:
        request_json = {"request": request}
        shape = rng.choice(
            [[[], request_json], [request_json, {}, {}], [[], [request_json], {}], [[], request_json, "x"], request]
        )
        entry["body"] = b64(json.dumps(shape).encode())
    elif kind == 9:
        embed = rng.choice([{"callbacks": [{"task": "x"}]}, {"chord": {}}, {"link": None}, {"chain": []}, []])
        entry["body"] = b64(body_of(request, embed))
    elif kind == 10:
        entry["body"] = b64(body_of({"request_id": marker, "prompt": marker + "x" * (MAX_MESSAGE_BYTES + 10)}))
    else:
        entry["body"] = b64(json.dumps([[], {"request": {"p": marker}}, {}]).encode() + b"[" * 5_000)


def hostile_request(rng: random.Random, marker: str) -> dict[str, Any]:
    """A valid envelope whose request fails validation: the task itself rejects it."""
    return rng.choice(
        [
            {"request_id": marker, "prompt": marker, "chain": "nope"},
            {"request_id": marker, "messages": []},
            {"request_id": marker, "messages": [{"role": "robot", "content": marker}]},
            {"request_id": marker, "prompt": marker, "surprise": 1},
            {"request_id": marker, "prompt": marker, "generation_kwargs": {"api_key": "sk-x"}},
        ]
    )


def raw_entry(rng: random.Random, marker: str) -> bytes:
    """Something that is no message envelope at all."""
    kind = rng.randrange(6)
    if kind == 0:
        return f"{marker} this is not a celery message {{".encode()
    if kind == 1:
        return marker.encode() + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    if kind == 2:
        return json.dumps(rng.choice([[marker, 1, 2], marker, {"m": marker}, {"m": marker, "body": "x"}])).encode()
    if kind == 3:
        return (marker + "[" * 50_000).encode()
    if kind == 4:
        return (f'{{"m": "{marker}", ' + '"x": ' * 3 + "1").encode()
    return (marker + "z" * rng.choice([10, 3_000, MAX_MESSAGE_BYTES * 9 + 40_000])).encode()


def generate(rng: random.Random, number: int) -> bytes:
    """Hostile entry ``number``: its marker ``hzNNNNNz`` is its task id where it has one and
    the first thing in what its dead letter keeps."""
    marker = f"hz{number:05d}z"
    kind = rng.randrange(5)
    if kind == 0:
        return raw_entry(rng, marker)
    header_id = rng.random() < 0.5
    if kind == 4:
        entry = envelope(marker, hostile_request(rng, marker), header_id=header_id)
    else:
        entry = envelope(marker, {"request_id": marker, "prompt": marker}, header_id=header_id)
        if kind in (1, 2):
            hostile_header(rng, entry)
        else:
            hostile_envelope_field(rng, entry, marker)
    return json.dumps(entry).encode()


def found_markers(letter: dict[str, Any]) -> set[str]:
    text = " ".join(str(letter.get(field) or "") for field in ("task_id", "request_id", "body"))
    return set(MARKER.findall(text))


# --- the run ------------------------------------------------------------------------------------


def test_every_hostile_message_is_dead_lettered_and_every_valid_one_answered_once(target: Target) -> None:
    rng = random.Random(SEED)
    pid = target.worker.pid
    valid: list[str] = []
    pipe = target.rdb.pipeline(transaction=False)
    for number in range(HOSTILE):
        pipe.lpush("chat", generate(rng, number))
        if number % VALID_EVERY == VALID_EVERY - 1:
            request_id = f"valid-{number:05d}"
            valid.append(request_id)
            pipe.lpush("chat", json.dumps(envelope(request_id, {"request_id": request_id, "prompt": "hi"})))
        if len(pipe) >= 200:
            pipe.execute()
    pipe.execute()

    def drained() -> bool:
        target.worker.assert_alive()
        answered = sum(target.rdb.exists(keys.reply_key(request_id)) for request_id in valid[-20:])
        return target.rdb.llen("chat") == 0 and target.rdb.llen(keys.DEAD_LETTERS) >= HOSTILE and answered == 20

    wait_until(drained, timeout_s=DRAIN_TIMEOUT_S, what="every entry taken and ended")
    writes = target.writes.drain()

    # The same worker process, alive.
    target.worker.assert_alive()
    assert (target.worker.pid, target.worker.starts) == (pid, 1)

    # Every valid request answered exactly once: one reply write, one terminal event.
    for request_id in valid:
        reply = stored_reply(target.rdb, request_id)
        assert reply is not None and reply.status == "succeeded", (request_id, reply)
        assert reply.replies[0].content == TEXT
        events = stored_events(target.rdb, request_id)
        assert [e.type for e in events if e.is_terminal] == ["done"], request_id
        assert [op for op in writes.get(keys.reply_key(request_id), []) if op == "set"] == ["set"], request_id

    # Every hostile entry in cascade:dead exactly once, with a reason.
    letters = dead_letters(target.rdb)
    assert len(letters) == HOSTILE
    seen: dict[str, int] = {}
    for letter in letters:
        assert letter["reason"] in REASONS and letter["message"], letter
        markers = found_markers(letter)
        assert len(markers) == 1, letter
        marker = markers.pop()
        seen[marker] = seen.get(marker, 0) + 1
    assert seen == {f"hz{n:05d}z": 1 for n in range(HOSTILE)}
    assert not any(found_markers({"body": request_id}) for request_id in valid)
