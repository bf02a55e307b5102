"""docker-compose.yml without a Docker engine: Debian's docker-compose (v1) validates the file, and
each worker service's command and environment run as local processes against a Redis started
from the redis service's own command; a request goes through each, and each healthcheck pings
its worker for real. The Dockerfile's two targets and the deploy config are checked too.

docker-compose is required in CI (``CI`` set: .ci/run installs it); elsewhere these tests skip
when it is missing."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from settings import load_settings
from tasks.producer.client import CascadeClient
from worker.demo.local import find_redis_server, free_port, stop_process

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "compose-smoke-password"
# What an operator puts in .env; the concurrency is lowered to keep the local run light.
COMPOSE_ENV = {"REDIS_PASSWORD": PASSWORD, "CASCADE_API_CONCURRENCY": "2", "CASCADE_GPU_BATCH_SIZE": "3"}

# Stands in for deploy/cascade.toml: scripted providers on both queues (no keys, no model).
CONFIG = """
[providers.api]
type = "scripted"
text = "answer from the chat queue"

[providers.local]
type = "scripted"
text = "answer from the chat.gpu queue"
queue = "chat.gpu"

[chains]
api = ["api"]
local = ["local"]
"""


def docker_compose() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        reason = "docker-compose is not installed (Debian: apt-get install docker-compose; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``docker-compose config`` with only ``env`` (and PATH): no .env, no stray variables."""
    return subprocess.run(
        [docker_compose(), "-f", "docker-compose.yml", "config"],
        cwd=REPO,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    result = compose_config(COMPOSE_ENV)
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def seconds(duration: str) -> float:
    found = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert found and duration, duration
    return int(found.group(1) or 0) * 60 + int(found.group(2) or 0)


def worker_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: s
        for name, s in compose["services"].items()
        if s.get("command", [])[:1] == ["celery"] and "worker" in s["command"][1:5]
    }


def option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_the_file_is_valid_and_requires_a_redis_password(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"redis", "worker", "worker-gpu", "flower", "otel-collector", "jaeger"}
    missing = compose_config({})
    assert missing.returncode != 0 and "REDIS_PASSWORD" in missing.stderr


def test_the_services_are_wired_for_operations(compose: dict[str, Any]) -> None:
    services = compose["services"]
    redis_service = services["redis"]
    assert option(redis_service["command"], "--appendonly") == "yes"
    assert option(redis_service["command"], "--requirepass") == PASSWORD
    assert "redis-cli ping" in " ".join(redis_service["healthcheck"]["test"])
    assert any(volume.startswith("redis-data:/data") for volume in redis_service["volumes"])

    workers = worker_services(compose)
    assert set(workers) == {"worker", "worker-gpu"}
    for name, service in workers.items():
        env = service["environment"]
        assert f":{PASSWORD}@redis:6379/" in env["CASCADE_REDIS_URL"]
        assert "container_name" not in service and "ports" not in service, f"{name} must scale with --scale"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        # The healthcheck pings this very worker through the broker.
        node = option(service["command"], "-n").split("@")[0]
        assert f"inspect ping -d {node}@$${{HOSTNAME}}" in service["healthcheck"]["test"][1]
        # Docker's SIGTERM becomes Celery's soft shutdown, and Docker waits longer than it lasts.
        assert env["REMAP_SIGTERM"] == "SIGQUIT"
        assert seconds(service["stop_grace_period"]) > float(env["CASCADE_SOFT_SHUTDOWN_S"]) + 5
        assert env["CASCADE_LOG_FORMAT"] == "json" and env["CASCADE_METRICS_PORT"] in service["expose"]
    api, gpu = workers["worker"], workers["worker-gpu"]
    assert (api["build"]["target"], option(api["command"], "-Q"), option(api["command"], "--concurrency")) == (
        "api",
        "chat",
        "2",
    )
    # API workers run one request per process; the GPU worker one process whose threads are the
    # requests its model batches (continuous batching), as many as CASCADE_GPU_BATCH_SIZE says.
    assert option(api["command"], "--pool") == "prefork"
    assert (gpu["build"]["target"], option(gpu["command"], "-Q"), option(gpu["command"], "--pool")) == (
        "gpu",
        "chat.gpu",
        "threads",
    )
    assert option(gpu["command"], "--concurrency") == "3"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert any(volume.startswith("model-cache:/models") for volume in gpu["volumes"])
    assert gpu["environment"]["HF_HOME"].startswith("/models/")
    assert gpu["environment"]["CASCADE_MODEL_CACHE"].startswith("/models/")
    assert services["flower"]["profiles"] == ["flower"] and services["worker-gpu"]["profiles"] == ["gpu"]
    assert services["otel-collector"]["profiles"] == services["jaeger"]["profiles"] == ["observability"]

    collector = yaml.safe_load((REPO / "deploy" / "otel-collector.yaml").read_text())
    pipelines = collector["service"]["pipelines"]
    assert pipelines["traces"]["receivers"] == ["otlp"] and "otlp/jaeger" in pipelines["traces"]["exporters"]
    assert "prometheus" in pipelines["metrics"]["receivers"]


def test_the_dockerfile_has_an_api_image_without_torch_and_a_gpu_image_with_it(compose: dict[str, Any]) -> None:
    stages: dict[str, str] = {}
    for block in re.split(r"^(?=FROM )", (REPO / "Dockerfile").read_text(), flags=re.M):
        found = re.match(r"FROM \S+ AS (\w+)", block)
        if found:
            stages[found.group(1)] = block
    assert {"base", "api", "gpu"} <= set(stages)
    runs = {
        name: " ".join(re.findall(r"^RUN (.*)$", text.replace("\\\n", " "), flags=re.M))
        for name, text in stages.items()
    }
    installs = {name: re.findall(r"pip install ([^&]*)", run) for name, run in runs.items()}
    assert [i.strip() for i in installs["api"]] == ["'.[otel]'"]
    assert "find_spec('torch') is None" in runs["api"]  # the build itself fails if torch crept in
    assert "ARG TORCH_SPEC=torch" in stages["gpu"] and '"${TORCH_SPEC}"' in runs["gpu"]
    assert "'.[otel,local]'" in runs["gpu"]
    assert "USER cascade" in stages["api"] and "USER cascade" in stages["gpu"]
    assert {s["build"]["target"] for s in worker_services(compose).values()} == {"api", "gpu"}


def test_the_deploy_config_is_valid_and_its_queues_have_workers(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CASCADE_CONFIG", str(REPO / "deploy" / "cascade.toml"))
    settings = load_settings()
    consumed = {option(s["command"], "-Q") for s in worker_services(compose).values()}
    assert {provider.queue for provider in settings.providers.values()} <= consumed


def test_the_gpu_workers_threads_match_the_batch_size_of_the_deploy_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset, CASCADE_GPU_BATCH_SIZE gives the GPU worker as many threads as the deploy config's
    local model batches requests: fewer would leave the batch short, more would hold messages
    that only wait."""
    result = compose_config({"REDIS_PASSWORD": PASSWORD})
    assert result.returncode == 0, result.stderr
    gpu = yaml.safe_load(result.stdout)["services"]["worker-gpu"]
    monkeypatch.setenv("CASCADE_CONFIG", str(REPO / "deploy" / "cascade.toml"))
    local = [p for p in load_settings().providers.values() if p.type == "hf_local" and p.queue == "chat.gpu"]
    assert local, "the deploy config serves a local model on chat.gpu"
    for provider in local:
        assert getattr(provider, "max_batch_size", None) == int(option(gpu["command"], "--concurrency"))


def wait_for(what: str, probe: Callable[[], Any], timeout_s: float = 30.0) -> Any:
    give_up = time.monotonic() + timeout_s
    while True:
        try:
            found = probe()
        except (OSError, redis.RedisError):
            found = None
        if found:
            return found
        if time.monotonic() > give_up:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def local_redis(compose: dict[str, Any], tmp_path: Path) -> Iterator[int]:
    """The redis service's command, on a free loopback port."""
    port = free_port()
    command = compose["services"]["redis"]["command"]
    args = [find_redis_server(), *command[1:], "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)]
    with (tmp_path / "redis.log").open("wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = redis.Redis(port=port, password=PASSWORD)
        wait_for("redis", client.ping, timeout_s=10)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        client.close()
        yield port
    finally:
        stop_process(process)


def test_each_worker_service_runs_locally_answers_and_passes_its_healthcheck(
    compose: dict[str, Any], local_redis: int, tmp_path: Path
) -> None:
    config = tmp_path / "cascade.toml"
    config.write_text(CONFIG)
    bin_dir = str(Path(sys.executable).parent)  # where the celery script of this Python lives
    processes: dict[str, subprocess.Popen[bytes]] = {}
    envs: dict[str, dict[str, str]] = {}
    metrics: dict[str, int] = {}
    try:
        for name, service in worker_services(compose).items():
            env = {str(k): str(v) for k, v in service["environment"].items()}
            env["CASCADE_REDIS_URL"] = env["CASCADE_REDIS_URL"].replace("@redis:6379/", f"@127.0.0.1:{local_redis}/")
            metrics[name] = free_port()
            env.update(
                CASCADE_CONFIG=str(config),  # the container path of deploy/cascade.toml does not exist here
                CASCADE_METRICS_PORT=str(metrics[name]),
                CASCADE_METRICS_HOST="127.0.0.1",
                CASCADE_SOFT_SHUTDOWN_S="1",  # so that stopping the test's workers is quick
            )
            for key in ("HF_HOME", "CASCADE_MODEL_CACHE"):
                if key in env:
                    env[key] = str(tmp_path / name / key.lower())
            envs[name] = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", **env}
            command = [sys.executable, "-m", *service["command"]]
            with (tmp_path / f"{name}.log").open("wb") as log:
                processes[name] = subprocess.Popen(
                    command, env=envs[name], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )

        url = f"redis://:{PASSWORD}@127.0.0.1:{local_redis}/0"
        with CascadeClient(url) as client:
            wait_for("both workers' routes", lambda: client.redis.hlen("cascade:routes") == 2)
            for chain, queue in (("api", "chat"), ("local", "chat.gpu")):
                assert client.route(chain) == queue
                reply = client.wait(client.submit(prompt="hello", chain=chain), timeout_s=60)
                assert reply.status == "succeeded" and reply.meta.queue_hops == 0, reply
                assert reply.replies[0].content == f"answer from the {queue} queue"

        host = {"HOSTNAME": socket.gethostname()}  # what a container's shell has
        for name, service in worker_services(compose).items():
            kind, check = service["healthcheck"]["test"]
            assert kind == "CMD-SHELL"
            check = check.replace("$$", "$")
            healthy = subprocess.run(["sh", "-c", check], env={**envs[name], **host}, cwd=REPO, capture_output=True)
            assert healthy.returncode == 0, healthy.stdout + healthy.stderr

            def served(port: int = metrics[name]) -> bool:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                    return 'status="succeeded"' in response.read().decode()

            wait_for(f"{name}'s metrics", served)
        # A healthcheck that pings a node that is not there fails: the check is real.
        name = "worker"
        ghost = subprocess.run(
            ["sh", "-c", worker_services(compose)[name]["healthcheck"]["test"][1].replace("$$", "$")],
            env={**envs[name], "HOSTNAME": "no-such-host"},
            cwd=REPO,
            capture_output=True,
        )
        assert ghost.returncode != 0

        for name in processes:
            for line in (tmp_path / f"{name}.log").read_text().splitlines():
                if line.strip():
                    assert isinstance(json.loads(line), dict), f"{name}: {line}"
    finally:
        for process in processes.values():
            stop_process(process)
