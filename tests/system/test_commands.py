"""The commands a newcomer runs: `cascade demo`, `cascade submit/reply/cancel`, and a worker
started with a bad configuration."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.producer.client import CascadeClient
from tests.support.stack import REPO, local_stack

pytestmark = pytest.mark.integration

CONFIG = """
[providers.slow]
type = "scripted"
text = "one two three four five six seven eight nine ten eleven twelve"
chunk_size = 4
chunk_delay_ms = 100

[providers.quick]
type = "scripted"
text = "The capital of France is Paris."
chunk_size = 5

[chains]
default = ["quick"]
slow = ["slow"]
"""


def run_cli(*args: str, redis_url: str | None = None, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the `cascade` command in a subprocess."""
    command = [sys.executable, "-m", "tasks.producer.cli"]
    if redis_url:
        command += ["--redis-url", redis_url]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout_s, cwd=REPO, check=False)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server and one worker with CONFIG; yields the Redis URL."""
    with local_stack(tmp_path_factory.mktemp("commands"), CONFIG) as stack:
        yield stack.url


def run_demo(*args: str, timeout_s: float) -> str:
    """Run `cascade demo` with ``args``, which must succeed; its output."""
    result = run_cli("demo", *args, timeout_s=timeout_s)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_demo_streams_an_answer_and_shows_the_fallback() -> None:
    shown = run_demo("--chain", "rehearsal", timeout_s=120)
    assert "falling back" in shown
    assert "Natural Language Processing (NLP) is the branch" in shown
    assert "status: succeeded" in shown
    assert "attempts (2): flaky:failed/stream_interrupted, steady:succeeded" in shown


@pytest.mark.slow
def test_demo_streams_a_real_answer_from_smollm2() -> None:
    shown = run_demo("--prompt", "What is the capital of France?", timeout_s=300)
    assert "Paris" in shown
    assert "provider: smol (chain index 0)" in shown
    assert "choice 0: model HuggingFaceTB/SmolLM2-135M-Instruct" in shown


def test_submit_prints_the_tokens_then_the_meta(service: str) -> None:
    result = run_cli("submit", "--prompt", "What is the capital of France?", redis_url=service)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "The capital of France is Paris."
    assert "status: succeeded" in result.stderr
    assert "provider: quick" in result.stderr


def test_reply_shows_a_stored_reply_as_json(service: str) -> None:
    request_id = f"cli-{uuid.uuid4().hex}"
    submitted = run_cli("submit", "--prompt", "hi", "--id", request_id, redis_url=service)
    assert submitted.returncode == 0, submitted.stderr
    shown = run_cli("reply", request_id, "--json", redis_url=service)
    assert shown.returncode == 0
    assert f'"request_id": "{request_id}"' in shown.stdout
    assert '"status": "succeeded"' in shown.stdout
    missing = run_cli("reply", "no-such-request", redis_url=service)
    assert missing.returncode == 1


def test_cancel_stops_a_running_request(service: str) -> None:
    request_id = f"cli-{uuid.uuid4().hex}"
    submitted = run_cli(
        "submit", "--prompt", "count", "--chain", "slow", "--id", request_id, "--no-follow", redis_url=service
    )
    assert submitted.returncode == 0, submitted.stderr
    with CascadeClient(service) as client:
        events = client.events(request_id, timeout_s=30)
        first = next(event for event in events if event.type == "chunk")
        assert first.delta
        cancelled = run_cli("cancel", request_id, redis_url=service)
        assert cancelled.returncode == 0
        terminal = [event for event in events if event.is_terminal]
        reply = client.reply(request_id)
    assert [event.type for event in terminal] == ["cancelled"]
    assert reply is not None and reply.status == "cancelled"
    assert reply.error is not None and reply.error.type == "cancelled"


def test_worker_with_a_bad_config_stops_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        '[providers.steady]\ntype = "scripted"\ntext = "x"\nchunk_size = 0\n[chains]\ndefault = ["steady", "missing"]\n'
    )
    env = {**os.environ, "CASCADE_CONFIG": str(config), "CASCADE_REDIS_URL": "redis://127.0.0.1:1/0"}
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", "chat"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=env,
        check=False,
    )
    assert result.returncode == 2
    assert "providers.steady.chunk_size" in result.stderr
    assert "Traceback" not in result.stderr
