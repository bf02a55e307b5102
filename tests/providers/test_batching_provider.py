"""The hf_local provider with ``max_batch_size`` above 1: requests share one model at once.

Each batched answer is compared with the same provider's one-at-a-time path (``max_batch_size``
1) on the same tiny random Llama model. Every wait is bounded: futures take timeouts and the
calls carry deadlines.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

pytest.importorskip("torch")
pytest.importorskip("transformers")

from providers import errors
from providers.base import ProviderCall, StreamingChunk
from providers.huggingface.batching import BatchingEngine
from providers.huggingface.local import HfLocalProvider
from settings.providers import HfLocalConfig
from tasks.contract.schemas import AssistantReply, ChatMessage
from tests.support import calls
from tests.support.tiny_model import build_tiny_model
from tests.support.waiting import wait_until
from worker.state.lease import LeaseLost

WAIT_S = 60.0
TOPICS = ["hello world", "The capital of France", "Queues carry requests", "numbers 0 1 2 3", "Redis", "Natural"]
BATCHED: dict[str, Any] = {"max_batch_size": 4, "kv_block_size": 32, "max_tokens_per_request": 256}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def sequential(tiny_model: Path) -> HfLocalProvider:
    alone = HfLocalProvider("alone", HfLocalConfig(model=str(tiny_model), device="cpu", max_new_tokens=32))
    alone.warm_up()
    return alone


@pytest.fixture(scope="module")
def batched(tiny_model: Path) -> Iterator[HfLocalProvider]:
    shared = HfLocalProvider("shared", HfLocalConfig(model=str(tiny_model), device="cpu", max_new_tokens=32, **BATCHED))
    shared.warm_up()
    yield shared
    engine(shared).close()


def engine(provider: HfLocalProvider) -> BatchingEngine:
    found = provider._engine
    assert found is not None, "warm_up starts the engine of a batching provider"
    return found


def call(topic: str, deadline_s: float = WAIT_S, **generation_kwargs: Any) -> ProviderCall:
    messages = [ChatMessage(role="user", content=topic)]
    return calls.make_call(messages=messages, deadline_s=deadline_s, **generation_kwargs)


def answer(provider: HfLocalProvider, topic: str, **generation_kwargs: Any) -> tuple[AssistantReply, str]:
    collect = calls.ChunkCollector()
    [reply] = provider.run(call(topic, **generation_kwargs), collect)
    return reply, collect.text


def test_concurrent_requests_each_stream_their_own_greedy_answer(
    batched: HfLocalProvider, sequential: HfLocalProvider
) -> None:
    expected = {topic: answer(sequential, topic)[0] for topic in TOPICS}
    with ThreadPoolExecutor(len(TOPICS)) as pool:
        futures = {topic: pool.submit(answer, batched, topic) for topic in TOPICS}
        results = {topic: future.result(timeout=WAIT_S) for topic, future in futures.items()}
    for topic, (reply, streamed) in results.items():
        assert streamed == reply.content == expected[topic].content, topic
        assert reply.meta.usage == expected[topic].meta.usage, topic
        assert reply.meta.finish_reason == expected[topic].meta.finish_reason, topic
        assert reply.meta.completion_start_time is not None
    assert engine(batched).active_requests == 0


def test_each_request_keeps_its_own_max_new_tokens(batched: HfLocalProvider) -> None:
    limits = [3, 9, 17, 100]  # 100 asks for more than the entry's max_new_tokens: it gets 32
    with ThreadPoolExecutor(len(limits)) as pool:
        futures = [pool.submit(answer, batched, "hello world", max_tokens=limit) for limit in limits]
        replies = [future.result(timeout=WAIT_S)[0] for future in futures]
    assert [reply.meta.usage.completion_tokens for reply in replies] == [3, 9, 17, 32]
    assert {reply.meta.finish_reason for reply in replies} == {"length"}


def test_a_stop_word_ends_only_its_own_request(batched: HfLocalProvider, sequential: HfLocalProvider) -> None:
    full = answer(sequential, "Redis")[0].content or ""
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    with ThreadPoolExecutor(2) as pool:
        stopped = pool.submit(answer, batched, "Redis", stop=[stop])
        other = pool.submit(answer, batched, "Redis")
        stopped_reply, streamed = stopped.result(timeout=WAIT_S)
        assert other.result(timeout=WAIT_S)[0].content == full
    assert stopped_reply.meta.finish_reason == "stop"
    assert streamed == stopped_reply.content
    # It ends at the token that completes the stop word, as the one-at-a-time path does.
    assert full.startswith(stopped_reply.content or "-")
    assert (stopped_reply.content or "").startswith(full[: full.index(stop) + len(stop)])
    assert stopped_reply.content == answer(sequential, "Redis", stop=[stop])[0].content


@pytest.mark.parametrize("stop", [errors.Cancelled, LeaseLost], ids=["cancel", "lost-lease"])
def test_a_stop_takes_the_request_out_while_the_others_finish(
    batched: HfLocalProvider, sequential: HfLocalProvider, stop: type[errors.RequestStopped]
) -> None:
    seen: list[str] = []

    def cancel_after_three(chunk: StreamingChunk) -> None:
        seen.append(chunk.content)
        if len(seen) == 3:
            raise stop("stopped by the run")

    def cancelled() -> BaseException:
        with pytest.raises(stop) as caught:
            batched.run(call("numbers 0 1 2 3"), cancel_after_three)
        return caught.value

    expected = answer(sequential, "Queues carry requests")[0].content
    with ThreadPoolExecutor(2) as pool:
        stopped = pool.submit(cancelled)
        running = pool.submit(answer, batched, "Queues carry requests")
        assert isinstance(stopped.result(timeout=WAIT_S), stop)
        assert running.result(timeout=WAIT_S)[0].content == expected
    assert len(seen) == 3
    assert engine(batched).active_requests == 0


def test_the_deadline_takes_a_waiting_request_out_of_the_batch(batched: HfLocalProvider) -> None:
    # The loop is held, so the request gets no token before its deadline: the guard cancels it.
    with engine(batched).paused(), pytest.raises(errors.DeadlineExceeded):
        batched.run(call("hello world", deadline_s=0.3), lambda _: None)
    assert engine(batched).active_requests == 0
    assert answer(batched, "hello world", max_tokens=4)[0].meta.usage.completion_tokens == 4


def test_a_request_that_can_never_fit_fails_alone(tiny_model: Path, sequential: HfLocalProvider) -> None:
    small = HfLocalProvider(
        "small",
        HfLocalConfig(
            model=str(tiny_model),
            device="cpu",
            max_new_tokens=16,
            max_batch_size=2,
            kv_block_size=16,
            kv_num_blocks=4,
            max_tokens_per_request=64,
        ),
    )
    small.warm_up()
    try:
        expected = answer(sequential, "Redis", max_tokens=16)[0].content
        with ThreadPoolExecutor(2) as pool:
            fine = pool.submit(answer, small, "Redis")
            huge = pool.submit(answer, small, "Redis " * 80)
            with pytest.raises(errors.ContextLengthExceeded):
                huge.result(timeout=WAIT_S)
            assert fine.result(timeout=WAIT_S)[0].content == expected
    finally:
        engine(small).close()


def test_requests_beyond_the_batch_size_wait_their_turn(batched: HfLocalProvider, sequential: HfLocalProvider) -> None:
    topics = TOPICS * 2  # 12 requests on a batch of 4
    expected = {topic: answer(sequential, topic, max_tokens=8)[0].content for topic in TOPICS}
    with ThreadPoolExecutor(len(topics)) as pool:
        futures = [(topic, pool.submit(answer, batched, topic, max_tokens=8)) for topic in topics]
        for topic, future in futures:
            assert future.result(timeout=WAIT_S)[0].content == expected[topic], topic


def test_sampled_requests_share_the_batch(batched: HfLocalProvider) -> None:
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(answer, batched, topic, temperature=0.9, top_p=0.9, top_k=20) for topic in TOPICS[:3]]
        for future in futures:
            reply, streamed = future.result(timeout=WAIT_S)
            assert streamed == reply.content and reply.meta.usage.completion_tokens > 0


def test_the_batching_path_never_starts_a_generate_thread(batched: HfLocalProvider) -> None:
    answer(batched, "hello world", max_tokens=4)
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("generate-shared")]
    wait_until(lambda: engine(batched).active_requests == 0, timeout_s=5, what="no request left in the batch")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_batch_size": 2, "kv_num_blocks": 8, "kv_memory_fraction": 0.5}, "not both"),
        ({"max_batch_size": 2, "max_new_tokens": 512, "max_tokens_per_request": 512}, "must exceed max_new_tokens"),
        ({"max_batch_size": 2, "kv_num_blocks": 1, "kv_block_size": 16}, r"kv_num_blocks \* kv_block_size"),
        ({"kv_memory_fraction": 1.5}, "kv_memory_fraction"),
        ({"kv_block_size": 2}, "kv_block_size"),
    ],
)
def test_batching_settings_are_validated(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        HfLocalConfig(model="m", **fields)


def test_the_defaults_keep_one_generation_at_a_time() -> None:
    config = HfLocalConfig(model="m")
    assert config.max_batch_size == 1
    assert not HfLocalProvider("one", config).batching
