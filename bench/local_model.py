"""Local-model streaming through Cascade against a raw ``generate`` call, in one run.

Cascade: a producer submits to a warm ``chat.gpu`` worker serving SmolLM2-135M-Instruct and
a subscriber times the first and last chunk events it reads from Redis. Raw: the same model,
prompt and settings in this process, ``model.generate`` with a ``TextIteratorStreamer``. The
two alternate, request by request, so drift on a shared machine hits both alike.

    python -m bench.local_model [--runs 7] [--tokens 64] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from providers.huggingface.local_models import SMOLLM2_ID, load_model
from settings.providers import HfLocalConfig
from tasks.producer.client import CascadeClient
from worker.demo.local import LocalRedis, start_worker, stop_process

PROMPT = "Explain in a few sentences why the sky is blue."
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Sample:
    """One request: time to first token, total time, tokens generated."""

    ttft_s: float
    total_s: float
    tokens: int

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens over the whole request time."""
        return self.tokens / self.total_s


def raw_generate(loaded: Any, tokens: int) -> Sample:
    """The baseline: ``generate`` with a streamer, in this process."""
    from transformers import TextIteratorStreamer

    started = time.perf_counter()
    inputs = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(loaded.model.device)
    streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    result: dict[str, Any] = {}

    def generate() -> None:
        import torch

        with torch.inference_mode():  # as the provider does, so the baseline is not handicapped
            result["ids"] = loaded.model.generate(
                **inputs, streamer=streamer, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False
            )

    thread = threading.Thread(target=generate)
    thread.start()
    first = None
    for text in streamer:
        if text and first is None:
            first = time.perf_counter()
    thread.join()
    done = time.perf_counter()
    generated = int(result["ids"].shape[1] - inputs["input_ids"].shape[1])
    return Sample(ttft_s=(first or done) - started, total_s=done - started, tokens=generated)


def through_cascade(client: CascadeClient, tokens: int) -> Sample:
    """One request through Redis, Celery and the worker, timed by a subscriber."""
    started = time.perf_counter()
    request_id = client.submit(
        prompt=PROMPT,
        chain="local",
        queue="chat.gpu",
        generation_kwargs={"max_tokens": tokens, "min_new_tokens": tokens},
    )
    first = None
    for event in client.events(request_id, timeout_s=300):
        if event.type == "chunk" and first is None:
            first = time.perf_counter()
    done = time.perf_counter()
    reply = client.reply(request_id)
    assert reply is not None and reply.status == "succeeded", reply
    tokens_generated = reply.replies[0].meta.usage.completion_tokens
    return Sample(ttft_s=(first or done) - started, total_s=done - started, tokens=tokens_generated)


def median(values: list[float]) -> float:
    """The median."""
    return statistics.median(values)


def run(runs: int, tokens: int) -> dict[str, Any]:
    """Measure both paths ``runs`` times each after a warm-up; return the figures."""
    config = HfLocalConfig(model=SMOLLM2_ID, device="cpu", queue="chat.gpu", max_new_tokens=tokens)
    loaded = load_model(config)  # also converts the GGUF once, before the worker needs it
    with tempfile.TemporaryDirectory(prefix="cascade-bench-") as workdir:
        toml = Path(workdir) / "bench.toml"
        toml.write_text(
            f'[providers.smol]\ntype = "hf_local"\nmodel = "{SMOLLM2_ID}"\ndevice = "cpu"\n'
            f'queue = "chat.gpu"\nmax_new_tokens = {tokens}\n[chains]\nlocal = ["smol"]\n'
        )
        server = LocalRedis(Path(workdir)).start()
        with (Path(workdir) / "worker.log").open("wb") as log:
            worker = start_worker(server.url, toml, queues="chat.gpu", log=log, cwd=REPO)
        try:
            with CascadeClient(server.url) as client:
                through_cascade(client, 8)  # warm-up: worker start, model load, first generate
                raw_generate(loaded, 8)
                raw: list[Sample] = []
                cascade: list[Sample] = []
                for _ in range(runs):
                    raw.append(raw_generate(loaded, tokens))
                    cascade.append(through_cascade(client, tokens))
        finally:
            stop_process(worker)
            server.stop()
    raw_tps = median([s.tokens_per_s for s in raw])
    cascade_tps = median([s.tokens_per_s for s in cascade])
    return {
        "runs": runs,
        "tokens": tokens,
        "raw_tokens_per_s": raw_tps,
        "cascade_tokens_per_s": cascade_tps,
        "ratio": cascade_tps / raw_tps,
        "raw_ttft_ms": median([s.ttft_s for s in raw]) * 1000,
        "cascade_ttft_ms": median([s.ttft_s for s in cascade]) * 1000,
        "ttft_delta_ms": (median([s.ttft_s for s in cascade]) - median([s.ttft_s for s in raw])) * 1000,
        "tokens_seen": sorted({s.tokens for s in cascade} | {s.tokens for s in raw}),
    }


def report(figures: dict[str, Any], command: str) -> str:
    """The BENCHMARKS.md section for these figures."""
    ratio_ok = "met" if figures["ratio"] >= 0.95 else "MISSED"
    ttft_ok = "met" if figures["ttft_delta_ms"] < 50 else "MISSED"
    return (
        "## Local model: streaming through Cascade vs raw `generate`\n\n"
        f"SmolLM2-135M-Instruct on the CPU, greedy, {figures['tokens']} new tokens, "
        f"median of {figures['runs']} requests each, alternating. "
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()} ({platform.processor() or 'cpu'}), "
        "2 cores, by:\n\n"
        f"    {command}\n\n"
        "| measure | raw generate | through Cascade (Redis subscriber) | result | target |\n"
        "| --- | --- | --- | --- | --- |\n"
        f"| tokens/s | {figures['raw_tokens_per_s']:.1f} | {figures['cascade_tokens_per_s']:.1f} | "
        f"ratio {figures['ratio']:.3f} | >= 0.95 ({ratio_ok}) |\n"
        f"| time to first token | {figures['raw_ttft_ms']:.1f} ms | {figures['cascade_ttft_ms']:.1f} ms | "
        f"{figures['ttft_delta_ms']:+.1f} ms | < 50 ms ({ttft_ok}) |\n\n"
        "Cascade's times run from `submit()` to the chunk events a subscriber reads, so they include "
        "the queue hop, the worker's prompt templating and the Redis round trip of every chunk.\n"
    )


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--write", type=Path, help="replace this benchmark's section of the file")
    args = parser.parse_args()
    figures = run(args.runs, args.tokens)
    text = report(figures, f"python -m bench.local_model --runs {args.runs} --tokens {args.tokens}")
    print(text)
    if args.write:
        from bench.report import replace_section

        replace_section(args.write, "## Local model:", text)


if __name__ == "__main__":
    main()
