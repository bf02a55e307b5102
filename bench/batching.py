"""Continuous batching on a local model: aggregate tokens/s and first-token times at several
numbers of concurrent requests, four ways side by side in one run, on the same prompts.

* **Cascade, batched**: a real worker ``-P threads -c N`` serving ``hf_local`` with
  ``max_batch_size = N`` (N = 4, 8, 16; a single request goes to the 4-wide worker).
* **Cascade, one at a time**: a prefork worker ``-c 1`` with ``max_batch_size = 1`` (``generate``).
* **raw ``generate_batch``**: transformers' continuous batching called in this process, the
  same KV cache layout (block size, blocks per request), no Redis, no Celery.
* **``transformers serve --continuous_batching``**: the server a user would otherwise run, its
  OpenAI-compatible streaming endpoint called over loopback HTTP.

SmolLM2-135M-Instruct on the CPU, greedy, ``--tokens`` new tokens at most. At each level C the
first C prompts go out at once (one thread per request); tokens/s is the completion tokens of
all C over the time from the first send to the last answer, and a request's first token is the
time from its send to its first streamed text. Greedy answers of every path are compared with
Cascade's one-at-a-time answers to the same prompts. The levels run in turn, each level's paths
back to back.

    python -m bench.batching [--tokens 32] [--levels 1,4,8,16] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from bench.common import REPO, Stack, Stats, bench_main, celery_worker_args, checks_table, measured_by
from providers.huggingface.local_models import SMOLLM2_ID, load_model, resolve_model_path
from settings.providers import HfLocalConfig
from tasks.producer.client import CascadeClient
from worker.demo.local import free_port

HEADING = "## Continuous batching:"
PROMPTS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Who wrote Hamlet?",
    "What is the largest planet in the solar system?",
    "Explain photosynthesis in one sentence.",
    "What is 12 times 12?",
    "Give me a synonym for happy.",
    "Why is the sky blue?",
    "What language is spoken in Brazil?",
    "Name a famous painting by Leonardo da Vinci.",
    "What does a CPU do?",
    "How many legs does a spider have?",
    "What is the boiling point of water in Celsius?",
    "Suggest a name for a pet goldfish.",
    "What is the opposite of cold?",
    "Describe a cat in five words.",
]
WIDTHS = (4, 8, 16)  # the batching workers' -c and max_batch_size
BLOCK_SIZE = 64  # KV cache block (tokens), the same for every batching path
PER_REQUEST = 256  # prompt + new tokens a request may hold: sizes each cache at WIDTH requests
PATHS = ("cascade_batched", "cascade_sequential", "raw_generate_batch", "transformers_serve")
TARGET_VS_SEQUENTIAL = 1.5
TARGET_VS_RAW = 0.9


@dataclass
class Level:
    """One path at one concurrency: what each request got and how long it took."""

    wall_s: float = 0.0
    tokens: list[int] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        """tokens/s and first-token p50/p99 (ms), for the report."""
        ttft = Stats.of(self.ttft_s) if self.ttft_s else None
        return {
            "tokens_per_s": sum(self.tokens) / self.wall_s if self.wall_s else 0.0,
            "ttft_p50_ms": ttft.p50 * 1000 if ttft else None,
            "ttft_p99_ms": ttft.p99 * 1000 if ttft else None,
            "texts": self.texts,
        }


def at_once(count: int, one: Callable[[int], tuple[float, float, int, str]]) -> Level:
    """Run ``one(i)`` for i < ``count`` in ``count`` threads; each returns (sent, first, tokens, text)."""
    started = time.perf_counter()
    with ThreadPoolExecutor(count) as pool:
        results = list(pool.map(one, range(count)))
    level = Level(wall_s=time.perf_counter() - started)
    for sent, first, tokens, text in results:
        level.ttft_s.append(first - sent)
        level.tokens.append(tokens)
        level.texts.append(text)
    return level


def through_cascade(client: CascadeClient, queue: str, chain: str, count: int, tokens: int) -> Level:
    """``count`` requests at once through Redis and a Cascade worker, timed by their subscribers."""

    def one(index: int) -> tuple[float, float, int, str]:
        sent = time.perf_counter()
        request_id = client.submit(
            prompt=PROMPTS[index], chain=chain, queue=queue, generation_kwargs={"max_tokens": tokens}
        )
        first = None
        for event in client.events(request_id, timeout_s=600):
            if event.type == "chunk" and first is None:
                first = time.perf_counter()
        reply = client.reply(request_id)
        assert reply is not None and reply.status == "succeeded", reply
        answer = reply.replies[0]
        return sent, first or time.perf_counter(), answer.meta.usage.completion_tokens, answer.content or ""

    return at_once(count, one)


def raw_generate_batch(loaded: Any, count: int, tokens: int) -> Level:
    """transformers' ``generate_batch`` on the first ``count`` prompts, in this process."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    tokenizer = loaded.tokenizer
    inputs = [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=True
            )["input_ids"]
        )
        for prompt in PROMPTS[:count]
    ]
    width = max(count, 2)
    generation = GenerationConfig(  # type: ignore[no-untyped-call]
        max_new_tokens=tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    cb_config = ContinuousBatchingConfig(
        page_size=BLOCK_SIZE,
        num_blocks=-(-width * PER_REQUEST // BLOCK_SIZE),
        max_batch_tokens=512,
        max_requests_per_batch=width,
    )
    started = time.perf_counter()
    outputs = loaded.model.generate_batch(
        inputs, generation_config=generation, continuous_batching_config=cb_config, record_timestamps=True
    )
    level = Level(wall_s=time.perf_counter() - started)
    for output in outputs.values():
        stamps = output.timestamps or [time.perf_counter()]
        level.ttft_s.append(stamps[0] - started)
        generated = [token for token in output.generated_tokens if token != tokenizer.eos_token_id]
        level.tokens.append(len(output.generated_tokens))
        level.texts.append(tokenizer.decode(generated, skip_special_tokens=True))
    return level


class Serve:
    """``transformers serve --continuous-batching`` on a loopback port (stopped with the stack)."""

    def __init__(self, stack: Stack, model_path: str) -> None:
        self.model = model_path
        self.port = free_port()
        self.unavailable = self._missing()
        if self.unavailable:
            return
        binary = shutil.which("transformers", path=os.path.dirname(sys.executable)) or "transformers"
        args = [binary, "serve", "--continuous-batching", "--device", "cpu", "--host", "127.0.0.1"]
        args += ["--port", str(self.port), "--cb-block-size", str(BLOCK_SIZE), "--cb-max-batch-tokens", "512"]
        args += ["--cb-num-blocks", str(max(WIDTHS) * PER_REQUEST // BLOCK_SIZE), self.model]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        log = stack.log("serve")
        stack.adopt(
            subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        )

    @staticmethod
    def _missing() -> str | None:
        from transformers.utils.import_utils import is_serve_available

        if not is_serve_available():
            return "transformers serve needs fastapi, uvicorn, pydantic and openai (pip install 'cascade[bench]')"
        return None

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        """Until /health answers and a first greedy request (which starts its manager) is done."""
        give_up = time.monotonic() + timeout_s
        while time.monotonic() < give_up:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    self.one(0, 2)
                    return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError("transformers serve did not come up")

    def one(self, index: int, tokens: int) -> tuple[float, float, int, str]:
        """One streamed greedy chat completion: (sent, first text, completion tokens, text)."""
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": PROMPTS[index]}],
            "stream": True,
            "max_tokens": tokens,
            "temperature": 0,
        }
        sent = time.perf_counter()
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        first, pieces, completion = None, [], 0
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            for choice in chunk.get("choices", []):
                text = (choice.get("delta") or {}).get("content")
                if text:
                    first = first or time.perf_counter()
                    pieces.append(text)
            completion = (chunk.get("usage") or {}).get("completion_tokens", completion)
        connection.close()
        return sent, first or time.perf_counter(), completion, "".join(pieces)


def cascade_toml(tokens: int) -> str:
    """The sequential provider and one batching provider per width, each on its own queue."""
    common = f'type = "hf_local"\nmodel = "{SMOLLM2_ID}"\ndevice = "cpu"\nmax_new_tokens = {tokens}\n'
    text = f'[providers.seq]\n{common}queue = "chat.gpu.seq"\n\n'
    for width in WIDTHS:
        text += (
            f'[providers.b{width}]\n{common}queue = "chat.gpu.b{width}"\nmax_batch_size = {width}\n'
            f"kv_block_size = {BLOCK_SIZE}\nmax_tokens_per_request = {PER_REQUEST}\n\n"
        )
    chains = "".join(f'{name} = ["{name}"]\n' for name in ["seq", *(f"b{w}" for w in WIDTHS)])
    return text + "[chains]\n" + chains


def run(tokens: int = 32, levels: str = "1,4,8,16") -> dict[str, Any]:
    """Every path at every level; the figures for the report."""
    counts = [int(level) for level in levels.split(",")]
    if max(counts) > min(max(WIDTHS), len(PROMPTS)):
        raise ValueError(f"at most {min(max(WIDTHS), len(PROMPTS))} concurrent requests")
    loaded = load_model(HfLocalConfig(model=SMOLLM2_ID, device="cpu"))  # converts the GGUF once if needed
    results: dict[int, dict[str, Level | None]] = {}
    with Stack("batching") as stack:
        config = stack.config(cascade_toml(tokens))
        env = {**os.environ, "CASCADE_REDIS_URL": stack.url, "CASCADE_CONFIG": str(config)}
        stack.cascade_worker(config, queues="chat.gpu.seq", concurrency=1)
        for width in WIDTHS:
            args = celery_worker_args("worker", f"chat.gpu.b{width}", width)
            log = stack.log(f"batched-{width}")
            stack.adopt(
                subprocess.Popen(
                    [*args, "-P", "threads"],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=REPO,
                    start_new_session=True,
                )
            )
        serve = Serve(stack, resolve_model_path(HfLocalConfig(model=SMOLLM2_ID)))
        with CascadeClient(stack.url) as client:
            queues = {"seq": "chat.gpu.seq", **{f"b{w}": f"chat.gpu.b{w}" for w in WIDTHS}}
            with ThreadPoolExecutor(len(queues)) as pool:  # warm every worker (and wait for it)
                list(pool.map(lambda item: through_cascade(client, item[1], item[0], 1, 2), queues.items()))
            if not serve.unavailable:
                serve.wait_ready()
            raw_generate_batch(loaded, 2, 2)  # warm the raw path as the others were
            for count in counts:
                width = next(w for w in WIDTHS if w >= count)
                print(f"-- {count} concurrent", flush=True)
                results[count] = {
                    "cascade_sequential": through_cascade(client, "chat.gpu.seq", "seq", count, tokens),
                    "cascade_batched": through_cascade(client, f"chat.gpu.b{width}", f"b{width}", count, tokens),
                    "raw_generate_batch": raw_generate_batch(loaded, count, tokens),
                    "transformers_serve": None if serve.unavailable else at_once(count, lambda i: serve.one(i, tokens)),
                }
    return summarise(results, tokens, serve.unavailable)


def summarise(
    results: dict[int, dict[str, Level | None]], tokens: int, serve_unavailable: str | None
) -> dict[str, Any]:
    """Per level and path: the figures, and how many greedy answers differ from one-at-a-time."""
    table: dict[str, dict[str, Any]] = {}
    differ: dict[str, list[int]] = {path: [0, 0] for path in PATHS}
    for count, paths in results.items():
        reference = paths["cascade_sequential"]
        assert reference is not None
        table[str(count)] = {}
        for path, level in paths.items():
            if level is None:
                continue
            table[str(count)][path] = {k: v for k, v in level.figures().items() if k != "texts"}
            if path != "cascade_sequential":
                differ[path][0] += sum(a != b for a, b in zip(level.texts, reference.texts, strict=True))
                differ[path][1] += len(reference.texts)
    eight = table.get("8", {})
    ratio = lambda a, b: eight[a]["tokens_per_s"] / eight[b]["tokens_per_s"] if a in eight and b in eight else None  # noqa: E731
    return {
        "tokens": tokens,
        "levels": table,
        "differ": differ,
        "serve_unavailable": serve_unavailable,
        "at8_vs_sequential": ratio("cascade_batched", "cascade_sequential"),
        "at8_vs_raw": ratio("cascade_batched", "raw_generate_batch"),
    }


def checks(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets at 8 concurrent requests."""
    found = []
    for key, target, label in (
        ("at8_vs_sequential", TARGET_VS_SEQUENTIAL, "one at a time"),
        ("at8_vs_raw", TARGET_VS_RAW, "raw generate_batch"),
    ):
        value = figures.get(key)
        found.append(
            {
                "target": f"batching at 8 concurrent: tokens/s >= {target}x {label}",
                "measured": "not run" if value is None else f"{value:.2f}x",
                "ok": value is not None and value >= target,
            }
        )
    return found


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"


def report(figures: dict[str, Any], command: str, busy: tuple[float, float]) -> str:
    """The BENCHMARKS.md section."""
    lines = [
        f"{HEADING} a local model serving concurrent requests\n",
        f"SmolLM2-135M-Instruct on the CPU, greedy, at most {figures['tokens']} new tokens, {len(PROMPTS)} short "
        "questions (the first C at C concurrent). tokens/s: completion tokens of all C requests over the time from "
        "the first send to the last answer; first token: send to first streamed text, p50/p99 over the C requests "
        "(p99 is the slowest of them). Cascade is timed by Redis subscribers; `transformers serve` by HTTP clients.\n",
        measured_by(command, busy),
        "| concurrent | path | tokens/s | first token p50 (ms) | first token p99 (ms) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for count, paths in figures["levels"].items():
        for path in PATHS:
            if path in paths:
                f = paths[path]
                lines.append(
                    f"| {count} | {path.replace('_', ' ')} | {f['tokens_per_s']:.1f} | "
                    f"{_ms(f['ttft_p50_ms'])} | {_ms(f['ttft_p99_ms'])} |"
                )
    if figures["serve_unavailable"]:
        lines.append(f"\n`transformers serve` did not run: {figures['serve_unavailable']}.")
    differ = ", ".join(
        f"{path.replace('_', ' ')} {d}/{n}" for path, (d, n) in figures["differ"].items() if n and path in PATHS
    )
    lines.append(f"\nGreedy answers that differ from Cascade one at a time (`generate`): {differ}.")
    lines += checks_table(checks(figures))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    bench_main("batching", __doc__, HEADING, run, report, tokens=32, levels="1,4,8,16")  # type: ignore[arg-type]
