"""``make demo`` / ``cascade demo``: an embedded Redis, one worker, one streamed request.

Needs no Redis installed (see ``worker.local.find_redis_server``) and no API key: the demo
chain (``settings/demo.toml``) uses the ``scripted`` provider.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from tasks.cli import describe_reply, print_stream
from tasks.client import CascadeClient
from worker.local import LocalRedis, start_worker, stop_process

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "settings" / "demo.toml"


def run_demo(prompt: str, config: Path = DEMO_CONFIG, timeout_s: float = 120.0) -> int:
    """Run the demo end to end; return the exit status."""
    with tempfile.TemporaryDirectory(prefix="cascade-demo-") as workdir:
        server = LocalRedis(Path(workdir)).start()
        print(f"redis-server on 127.0.0.1:{server.port}; starting a worker (queue chat)...", flush=True)
        log_path = Path(workdir) / "worker.log"
        with log_path.open("wb") as log:
            worker = start_worker(server.url, config, log=log)
        try:
            with CascadeClient(server.url) as client:
                request_id = client.submit(prompt=prompt)
                print(f"request {request_id}: {prompt}\n", flush=True)
                reply = print_stream(client.events(request_id, timeout_s=timeout_s))
                if reply is None:
                    reply = client.reply(request_id)
            if reply is None:
                print(f"no reply; worker log:\n{log_path.read_text()}", file=sys.stderr)
                return 1
            print("\nstored reply:\n" + describe_reply(reply))
            return 0 if reply.status == "succeeded" else 1
        except TimeoutError:
            print(f"timed out; worker log:\n{log_path.read_text()}", file=sys.stderr)
            return 1
        finally:
            stop_process(worker)
            server.stop()
