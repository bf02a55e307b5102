"""GPU-routed queues with real workers: an API worker on `chat`, a local-model worker on
`chat.gpu` serving a tiny random Llama; requests hop between them and subscribers see one
stream. The API worker never loads torch."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from tasks.contract.schemas import ChatReply, StreamEvent
from tasks.producer.client import CascadeClient
from tests.support.stack import LocalStack, local_stack
from tests.support.stream_contract import assert_well_formed
from tests.support.tiny_model import build_tiny_model

pytestmark = pytest.mark.integration

CONFIG = """
[providers.api_cut]
type = "scripted"
text = "this api answer is cut off"
chunk_size = 5
fail = "cut"
fail_after_chunks = 2

[providers.api_ok]
type = "scripted"
text = "answer from the api queue"
chunk_size = 5

[providers.tiny]
type = "hf_local"
model = "{model}"
device = "cpu"
max_new_tokens = 8
queue = "chat.gpu"

[chains]
default = ["api_cut", "tiny"]
local_first = ["tiny", "api_ok"]
"""


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """An API worker on ``chat`` and a local-model worker on ``chat.gpu``."""
    workdir = tmp_path_factory.mktemp("gpu-routing")
    model = build_tiny_model(workdir / "tiny")
    with local_stack(workdir, CONFIG.format(model=model), queues=["chat", "chat.gpu"]) as stack:
        yield stack


def run(url: str, chain: str, queue: str | None = None) -> tuple[list[StreamEvent], ChatReply]:
    with CascadeClient(url) as client:
        request_id = client.submit(prompt="hello world", chain=chain, queue=queue)
        events = list(client.events(request_id, timeout_s=90))
        reply = client.reply(request_id)
    assert reply is not None
    return events, reply


def assert_one_stream(events: list[StreamEvent], reply: ChatReply) -> None:
    """One stream (the stream contract, across the hand-off too) that ends ``done``."""
    assert_well_formed(events, reply.request_id)
    assert events[-1].type == "done"


def test_a_chain_moves_from_the_api_queue_to_the_gpu_queue(deployment: LocalStack) -> None:
    events, reply = run(deployment.url, "default")
    assert_one_stream(events, reply)
    assert reply.status == "succeeded"
    assert reply.meta.provider == "tiny" and reply.meta.queue_hops == 1
    cut, local = reply.meta.attempts
    assert (cut.provider, cut.outcome, cut.error_type) == ("api_cut", "failed", "stream_interrupted")
    assert (local.provider, local.outcome) == ("tiny", "succeeded")
    assert cut.worker != local.worker
    fallback = next(event for event in events if event.type == "fallback")
    kept = [e.delta for e in events if e.type == "chunk" and e.attempt != fallback.attempt]
    assert "".join(d or "" for d in kept) == reply.replies[0].content


def test_the_producer_routes_straight_to_the_first_providers_queue(deployment: LocalStack) -> None:
    with CascadeClient(deployment.url) as client:
        assert client.route("local_first") == "chat.gpu"
        assert client.route("default") == "chat"
    events, reply = run(deployment.url, "local_first")
    assert_one_stream(events, reply)
    assert reply.meta.provider == "tiny" and reply.meta.queue_hops == 0


def test_a_request_on_the_wrong_queue_is_handed_off(deployment: LocalStack) -> None:
    events, reply = run(deployment.url, "local_first", queue="chat")
    assert_one_stream(events, reply)
    assert reply.meta.provider == "tiny" and reply.meta.queue_hops == 1


def process_group(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:
                pids.append(int(entry))
    return pids


def maps_torch(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def test_the_api_worker_never_loads_torch_and_the_gpu_worker_warms_up(deployment: LocalStack) -> None:
    run(deployment.url, "default")  # the API worker has served a chain that includes the local model
    api_pid, gpu_pid = deployment.workers["chat"].pid, deployment.workers["chat.gpu"].pid
    gpu_log = deployment.logs["chat.gpu"]
    api_processes = process_group(api_pid)
    gpu_processes = process_group(gpu_pid)
    assert len(api_processes) >= 2 and len(gpu_processes) >= 2  # main process + pool child
    assert not any(maps_torch(pid) for pid in api_processes)
    assert maps_torch(gpu_pid) is False, "the GPU worker's parent must not load torch before forking"
    assert any(maps_torch(pid) for pid in gpu_processes)
    deadline = time.monotonic() + 10
    while "warming up tiny" not in gpu_log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "warming up tiny on queue chat.gpu" in gpu_log.read_text()
