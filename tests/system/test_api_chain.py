"""A chain of real API providers against fake servers that speak each vendor's wire format,
served by a real worker: a failing OpenAI, then an Azure deployment that rejects the key
(echoing it back, as a careless proxy might), then TGI, which answers. Afterwards, nothing the
request produced — worker log, events, reply, Celery result, dead letters — holds a secret."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tasks.producer.client import CascadeClient
from tests.providers.openai_wire import chat_chunk, error_reply
from tests.providers.tgi_wire import chunk
from tests.support.fake_http import FakeHTTPServer, Reply
from tests.support.stack import local_stack
from tests.support.stored import everything_produced
from tests.support.stream_contract import assert_coherent

pytestmark = pytest.mark.integration

SECRETS = {
    "OPENAI_API_KEY": "sk-proj-LEAKCHECK-openai-0123456789",
    "AZURE_OPENAI_API_KEY": "azkey-LEAKCHECK-0123456789abcdef",
    "HF_API_TOKEN": "hf_LEAKCHECKtoken0123456789",
}
REDIS_PASSWORD = "redis-LEAKCHECK-password"

CONFIG = """
[providers.openai_primary]
type = "openai"
model = "gpt-4.1-mini"
api_base_url = "{openai}/v1"
max_retries = 1
backoff_initial_s = 0.01
timeout_s = 10

[providers.azure_backup]
type = "azure_openai"
azure_endpoint = "{azure}"
azure_deployment = "gpt-4o-mini-prod"
api_version = "2024-12-01-preview"
timeout_s = 10

[providers.tgi_local]
type = "hf_api"
api_type = "text_generation_inference"
url = "{tgi}"
api_key_env = "HF_API_TOKEN"  # a self-hosted URL gets only a key its entry names
timeout_s = 10

[chains]
default = ["openai_primary", "azure_backup", "tgi_local"]
"""


def tgi_chunk(content: str, finish: str | None = None) -> dict[str, object]:
    return chunk(content, finish, model="HuggingFaceTB/SmolLM2-1.7B-Instruct")


@dataclass
class Stack:
    url: str
    openai: FakeHTTPServer
    azure: FakeHTTPServer
    tgi: FakeHTTPServer
    worker_log: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("api-chain")
    with FakeHTTPServer() as openai, FakeHTTPServer() as azure, FakeHTTPServer() as tgi:
        openai.default = error_reply(500, "The server had an error while processing your request.", "server_error")
        azure.default = error_reply(
            401,
            f"Access denied due to invalid subscription key {SECRETS['AZURE_OPENAI_API_KEY']}.",
            code="401",
        )
        tgi.default = Reply(
            events=[tgi_chunk("The capital "), tgi_chunk("of France "), tgi_chunk("is Paris.", "eos_token"), "[DONE]"],
            chunked=True,
        )
        config = CONFIG.format(openai=openai.url, azure=azure.url, tgi=tgi.url)
        with local_stack(workdir, config, redis_password=REDIS_PASSWORD, extra_env=SECRETS) as local:
            yield Stack(local.url, openai, azure, tgi, local.logs["chat"])


def test_the_chain_falls_from_openai_to_azure_to_tgi_and_answers(stack: Stack) -> None:
    with CascadeClient(stack.url) as client:
        request_id = client.submit(prompt="What is the capital of France?", generation_kwargs={"max_tokens": 20})
        events = list(client.events(request_id, timeout_s=60))
        reply = client.reply(request_id)
    assert reply is not None and reply.status == "succeeded", reply
    assert_coherent(events, reply, request_id)
    assert reply.replies[0].content == "The capital of France is Paris."
    assert reply.replies[0].meta.finish_reason == "stop"
    assert reply.meta.provider == "tgi_local"
    assert reply.meta.successful_chat_generator_index == 2
    assert reply.meta.successful_chat_generator_class == "HfApiProvider"
    assert [(a.provider, a.error_type) for a in reply.meta.attempts] == [
        ("openai_primary", "server_error"),
        ("openai_primary", "server_error"),
        ("azure_backup", "auth"),
        ("tgi_local", None),
    ]
    assert reply.meta.failed_chat_generators == ["openai_primary", "azure_backup"]
    assert [e.type for e in events].count("fallback") == 3
    assert "".join(e.delta or "" for e in events if e.type == "chunk") == reply.replies[0].content
    # The wire: OpenAI's path, Azure's deployment URL and api-key header, TGI's Messages API.
    assert stack.openai.received[-1].path == "/v1/chat/completions"
    azure_request = stack.azure.received[-1]
    assert azure_request.path == "/openai/deployments/gpt-4o-mini-prod/chat/completions"
    assert azure_request.query["api-version"] == ["2024-12-01-preview"]
    assert {k.lower(): v for k, v in azure_request.headers.items()}["api-key"] == SECRETS["AZURE_OPENAI_API_KEY"]
    assert stack.tgi.received[-1].path == "/v1/chat/completions"
    assert {k.lower(): v for k, v in stack.tgi.received[-1].headers.items()}["authorization"] == (
        f"Bearer {SECRETS['HF_API_TOKEN']}"
    )


def test_a_stream_cut_mid_way_falls_back_and_the_next_provider_starts_afresh(stack: Stack) -> None:
    stack.openai.queue(
        Reply(events=[chat_chunk("", role="assistant"), chat_chunk("Lyon "), chat_chunk("is ")], cut_after=3)
    )
    with CascadeClient(stack.url) as client:
        request_id = client.submit(prompt="What is the capital of France?")
        events = list(client.events(request_id, timeout_s=60))
        reply = client.reply(request_id)
    assert reply is not None and reply.status == "succeeded"
    assert_coherent(events, reply, request_id)
    first = reply.meta.attempts[0]
    assert (first.provider, first.error_type, first.chunks) == ("openai_primary", "stream_interrupted", 2)
    cut = next(e for e in events if e.type == "fallback")
    assert cut.attempt == 1 and cut.error_type == "stream_interrupted"
    kept = "".join(e.delta or "" for e in events if e.type == "chunk" and e.attempt != cut.attempt)
    assert kept == reply.replies[0].content == "The capital of France is Paris."


def test_no_secret_in_anything_a_request_produced(stack: Stack) -> None:
    # A request whose every provider fails, so every error path has run.
    stack.tgi.queue(Reply(status=401, json_body={"error": f"bad token {SECRETS['HF_API_TOKEN']}"}))
    with CascadeClient(stack.url) as client:
        request_id = client.submit(prompt="hello")
        list(client.events(request_id, timeout_s=60))
        reply = client.reply(request_id)
    assert reply is not None and reply.status == "failed"
    assert reply.error is not None and reply.error.type == "all_providers_failed"

    store = redis.Redis.from_url(stack.url)
    try:
        everything = everything_produced(store, [stack.worker_log]) + reply.model_dump_json()
    finally:
        store.close()
    assert "auth" in everything  # the failures are there...
    for name, secret in {**SECRETS, "redis": REDIS_PASSWORD}.items():
        assert secret not in everything, f"{name} leaked"  # ...but not the secrets
