"""The continuous-batching engine on a tiny random Llama model built in a fixture.

Greedy answers are compared token for token with ``model.generate`` run one prompt at a time
on a second copy of the model. Every wait is bounded: futures and joins take timeouts, and
the engine's ``stall_timeout_s`` fails a request that stops producing output.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from providers import errors
from providers.huggingface.batching import BatchHandle, BatchingConfig, BatchingEngine, BatchResult, IncrementalDecoder
from tests.support.tiny_model import build_tiny_model
from tests.support.waiting import wait_until

WAIT_S = 60.0
TOPICS = ["hello world", "The capital of France", "Queues carry requests", "numbers 0 1 2 3", "Redis", "Natural"]


def load(path: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(path)
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> Any:
    """``generate`` one prompt at a time, greedy, on a model of its own."""
    import torch

    model, _ = load(tiny_model)

    def greedy(prompt: list[int], max_new_tokens: int) -> list[int]:
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
        return [int(token) for token in out[0][len(prompt) :]]

    return greedy


@pytest.fixture(scope="module")
def prompts(tiny_model: Path) -> list[list[int]]:
    _, tokenizer = load(tiny_model)
    return [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": topic}], add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        )
        for topic in TOPICS
    ]


def make_engine(path: Path, **overrides: Any) -> BatchingEngine:
    model, tokenizer = load(path)
    settings: dict[str, Any] = {"max_batch_size": 4, "block_size": 32, "max_tokens_per_request": 512}
    settings["stall_timeout_s"] = 30.0
    settings.update(overrides)
    return BatchingEngine(model, tokenizer, BatchingConfig(**settings))


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Iterator[BatchingEngine]:
    shared = make_engine(tiny_model)
    yield shared
    shared.close()


@pytest.fixture(autouse=True)
def nothing_left_running(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "engine" in request.fixturenames:
        shared: BatchingEngine = request.getfixturevalue("engine")
        wait_until(lambda: shared.active_requests == 0, timeout_s=WAIT_S, what="every request ended")


def run_all(engine: BatchingEngine, jobs: list[tuple[list[int], int]], **kwargs: Any) -> list[BatchResult]:
    """Submit and read every job from its own thread at once."""
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = [
            pool.submit(lambda job: engine.submit(job[0], max_new_tokens=job[1], **kwargs).collect(), job)
            for job in jobs
        ]
        return [future.result(timeout=WAIT_S) for future in futures]


def first_delta_then(handle: BatchHandle) -> tuple[threading.Thread, threading.Event, list[str]]:
    """Read ``handle`` in a thread; the event is set once its first delta has arrived."""
    started = threading.Event()
    deltas: list[str] = []

    def read() -> None:
        try:
            for delta in handle:
                deltas.append(delta)
                started.set()
        finally:
            started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert started.wait(WAIT_S), "no delta arrived"
    return reader, started, deltas


def in_batch(engine: BatchingEngine, request_id: str) -> bool:
    """Whether the manager still schedules ``request_id`` or holds KV blocks for it."""
    processor = engine._manager.batch_processor
    scheduler, cache = processor.scheduler, processor.cache
    held = any(request_id in allocator.block_table for allocator in cache.cache_allocators.values())
    return held or request_id in scheduler.active_requests or request_id in scheduler.waiting_requests


def test_concurrent_requests_each_get_their_own_greedy_tokens(
    engine: BatchingEngine, prompts: list[list[int]], reference: Any
) -> None:
    results = run_all(engine, [(prompt, 30) for prompt in prompts])
    expected = [reference(prompt, 30) for prompt in prompts]
    assert len({tuple(tokens) for tokens in expected}) > 1, "the prompts should not all give the same answer"
    for prompt, result, tokens in zip(prompts, results, expected, strict=True):
        assert result.token_ids == tokens
        assert result.text == engine.tokenizer.decode(tokens, skip_special_tokens=True)
        assert result.prompt_tokens == len(prompt)
        assert result.completion_tokens == len(tokens)
        assert result.finish_reason == ("length" if len(tokens) == 30 and tokens[-1] not in engine.eos_ids else "stop")


def test_each_request_honours_its_own_max_new_tokens(
    engine: BatchingEngine, prompts: list[list[int]], reference: Any
) -> None:
    jobs = list(zip(prompts[:4], [3, 11, 24, 47], strict=True))
    results = run_all(engine, jobs)
    for (prompt, limit), result in zip(jobs, results, strict=True):
        assert result.token_ids == reference(prompt, limit)
        assert result.completion_tokens <= limit


def test_a_request_joins_while_another_is_mid_generation(
    engine: BatchingEngine, prompts: list[list[int]], reference: Any
) -> None:
    long = engine.submit(prompts[0], max_new_tokens=400)
    reader, _, _ = first_delta_then(long)
    with engine.paused():  # the loop holds between two steps while the late request joins
        assert in_batch(engine, long.request_id), "the long request should still be generating"
        late = engine.submit(prompts[1], max_new_tokens=20)
    assert late.collect().token_ids == reference(prompts[1], 20)
    reader.join(WAIT_S)
    assert long.result is not None and long.result.token_ids == reference(prompts[0], 400)


def test_a_cancel_frees_the_request_and_the_others_continue(
    engine: BatchingEngine, prompts: list[list[int]], reference: Any
) -> None:
    doomed = engine.submit(prompts[2], max_new_tokens=450)
    survivor = engine.submit(prompts[3], max_new_tokens=40)
    reader, _, deltas = first_delta_then(doomed)
    with engine.paused():
        assert in_batch(engine, doomed.request_id), "the doomed request should still be generating"
        engine.cancel(doomed)
    reader.join(WAIT_S)
    assert not reader.is_alive(), "the cancelled request's iterator did not end"
    assert doomed.result is None and doomed.finished and deltas
    wait_until(lambda: not in_batch(engine, doomed.request_id), timeout_s=WAIT_S, what="cancelled request freed")
    assert survivor.collect().token_ids == reference(prompts[3], 40)


def test_a_reader_that_stops_early_cancels_its_request(engine: BatchingEngine, prompts: list[list[int]]) -> None:
    handle = engine.submit(prompts[4], max_new_tokens=450)
    for _ in handle:
        break
    assert handle.finished and handle.result is None
    wait_until(lambda: not in_batch(engine, handle.request_id), timeout_s=WAIT_S, what="abandoned request freed")


def test_a_stop_string_ends_the_request_at_the_token_that_completes_it(
    engine: BatchingEngine, prompts: list[list[int]], reference: Any
) -> None:
    decode = engine.tokenizer.decode
    tokens = reference(prompts[0], 40)
    # A stop string of clean text ending at some token k, not present before it.
    for k in range(6, 35):
        text = decode(tokens[:k], skip_special_tokens=True)
        stop = text[-3:]
        clean = "\ufffd" not in stop and stop.strip() == stop and len(stop) == 3
        if clean and stop not in decode(tokens[: k - 1], skip_special_tokens=True):
            break
    else:
        pytest.fail("no usable stop string in the reference answer")
    result = engine.submit(prompts[0], max_new_tokens=40, stop=[stop]).collect()
    assert result.finish_reason == "stop"
    assert result.token_ids == tokens[:k]
    assert result.text == text and result.text.endswith(stop)


def test_sampled_and_greedy_requests_share_a_batch(
    engine: BatchingEngine, prompts: list[list[int]], reference: Any
) -> None:
    with ThreadPoolExecutor(max_workers=3) as pool:
        sampled = pool.submit(
            lambda: engine.submit(
                prompts[5], max_new_tokens=25, do_sample=True, temperature=0.9, top_k=20, top_p=0.9
            ).collect()
        )
        greedy = [pool.submit(lambda p=p: engine.submit(p, max_new_tokens=25).collect()) for p in prompts[:2]]
        assert 0 < sampled.result(timeout=WAIT_S).completion_tokens <= 25
        for prompt, future in zip(prompts[:2], greedy, strict=True):
            assert future.result(timeout=WAIT_S).token_ids == reference(prompt, 25)


def test_a_request_too_large_for_the_cache_fails_alone(engine: BatchingEngine, prompts: list[list[int]]) -> None:
    running = engine.submit(prompts[1], max_new_tokens=30)
    with pytest.raises(errors.ContextLengthExceeded):
        engine.submit(prompts[0], max_new_tokens=engine.capacity_tokens)
    with pytest.raises(errors.BadProviderRequest):
        engine.submit([engine.vocab_size + 5], max_new_tokens=5)
    assert running.collect().completion_tokens > 0


def test_requests_that_do_not_fit_together_wait_for_room(
    tiny_model: Path, prompts: list[list[int]], reference: Any
) -> None:
    # 12 blocks of 16 tokens hold one request of ~14 + 120 tokens, not two.
    small = make_engine(tiny_model, block_size=16, num_blocks=12)
    try:
        jobs = [(prompt, 120) for prompt in prompts[:3]]
        results = run_all(small, jobs)
        assert small.capacity_tokens < 2 * (len(prompts[0]) + 120)
        for (prompt, limit), result in zip(jobs, results, strict=True):
            assert result.token_ids == reference(prompt, limit)
    finally:
        small.close()


def test_greedy_only_engine(tiny_model: Path, prompts: list[list[int]], reference: Any) -> None:
    greedy = make_engine(tiny_model, sampling=False)
    try:
        results = run_all(greedy, [(prompt, 20) for prompt in prompts[:3]], do_sample=True, temperature=0.8)
        for prompt, result in zip(prompts[:3], results, strict=True):
            assert result.token_ids == reference(prompt, 20)
    finally:
        greedy.close()


def test_closing_fails_running_requests_and_the_next_submit_starts_afresh(
    tiny_model: Path, prompts: list[list[int]], reference: Any
) -> None:
    own = make_engine(tiny_model)
    try:
        running = own.submit(prompts[0], max_new_tokens=450)
        first_delta = next(iter(running))
        own.close()
        with pytest.raises(errors.ServerError):
            running.collect()
        assert first_delta is not None
        assert own.submit(prompts[1], max_new_tokens=15).collect().token_ids == reference(prompts[1], 15)
    finally:
        own.close()


def test_a_forked_child_does_not_inherit_the_running_manager(engine: BatchingEngine, prompts: list[list[int]]) -> None:
    engine.submit(prompts[0], max_new_tokens=5).collect()  # the manager is running
    assert engine._manager is not None
    pid = os.fork()
    if pid == 0:  # the child: check and leave without running any cleanup
        os._exit(0 if engine._manager is None and engine.active_requests == 0 else 1)
    give_up = time.monotonic() + WAIT_S
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > give_up:
            os.kill(pid, 9)
            pytest.fail("the forked child did not exit")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0
    assert engine._manager is not None and engine._manager.is_running()


LEFT_OPEN = """
import sys
from pathlib import Path
from tests.providers.test_batching import load
from providers.huggingface.batching import BatchingConfig, BatchingEngine
model, tokenizer = load(Path(sys.argv[1]))
engine = BatchingEngine(model, tokenizer, BatchingConfig(max_batch_size=2, block_size=32, max_tokens_per_request=64))
print(engine.submit([1, 2, 3], max_new_tokens=4).collect().completion_tokens)
"""


def test_a_process_exits_with_an_engine_left_open(tiny_model: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", LEFT_OPEN, str(tiny_model)],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "4"


def test_incremental_decoding_never_splits_a_character(engine: BatchingEngine) -> None:
    text = "héllo wörld: 日本語 ✓ naïve"
    tokenizer = engine.tokenizer
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text), "the tiny tokenizer should split these characters into bytes"
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.push([token]) for token in ids] + [decoder.flush()]
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == text
