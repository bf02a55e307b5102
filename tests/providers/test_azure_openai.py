"""The ``azure_openai`` and ``azure_openai_responses`` providers at the wire level: the real
``openai.AzureOpenAI`` client against a fake Azure endpoint. Checks Azure's URL layout
(``/openai/deployments/{deployment}/chat/completions?api-version=...``,
``/openai/responses?api-version=...``), its ``api-key`` header, Azure AD tokens as
``Authorization: Bearer`` (from an env var or a ``module:callable`` provider), its
prompt-filter chunks and its error bodies."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from providers import errors
from providers.base import ChatProvider
from providers.openai.azure import AzureOpenAIChatProvider, AzureOpenAIResponsesProvider
from settings import ProviderConfigBase
from settings.providers import AzureOpenAIConfig, AzureOpenAIResponsesConfig
from tests.providers.openai_wire import (
    assert_no_secret,
    chat_chunk,
    chat_completion,
    chat_stream,
    error_reply,
    header,
    response_object,
    responses_answer,
)
from tests.support.calls import ChunkCollector, make_call, provider_factory, run_failing
from tests.support.fake_http import FakeHTTPServer, Reply

AZURE_KEY = "0123456789abcdef0123456789abcdef"
AD_TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJjb2duaXRpdmVzZXJ2aWNlcyJ9.c2lnbmF0dXJl"
DEPLOYMENT = "gpt-41-mini-prod"
API_VERSION = "2024-12-01-preview"
TOKEN_MODULE = """
calls = 0
imports = globals().get("imports", 0) + 1

def get_token():
    global calls
    calls += 1
    return "provider-token-%d" % calls

def broken():
    raise RuntimeError("no managed identity here")
"""

Factory = Callable[..., ChatProvider]


@pytest.fixture
def azure_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", AZURE_KEY)
    # The SDK would read these when no credential is given; make sure it is ours that is used.
    monkeypatch.delenv("AZURE_OPENAI_AD_TOKEN", raising=False)
    monkeypatch.delenv("OPENAI_API_VERSION", raising=False)


def azure_factory(
    provider_id: str, config_class: type[ProviderConfigBase], provider_class: type[ChatProvider], endpoint: str
) -> Factory:
    """Providers of ``provider_class`` on the fake server's ``DEPLOYMENT``, without retries."""
    return provider_factory(
        provider_id, config_class, provider_class, azure_endpoint=endpoint, azure_deployment=DEPLOYMENT, max_retries=0
    )


@pytest.fixture
def make_chat(server: FakeHTTPServer, azure_env: None) -> Factory:
    return azure_factory("azure", AzureOpenAIConfig, AzureOpenAIChatProvider, f"{server.url}/")


@pytest.fixture
def make_responses(server: FakeHTTPServer, azure_env: None) -> Factory:
    return azure_factory("azure_thinker", AzureOpenAIResponsesConfig, AzureOpenAIResponsesProvider, server.url)


@pytest.fixture
def token_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An importable module holding token callables; its name is returned."""
    name = "cascade_test_azure_tokens"
    (tmp_path / f"{name}.py").write_text(TOKEN_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


# --- Chat Completions on Azure -----------------------------------------------------------------


def test_chat_url_layout_key_header_and_body(server: FakeHTTPServer, make_chat: Factory) -> None:
    server.queue(Reply(json_body=chat_completion("Paris.", model="gpt-4.1-mini")))

    (reply,) = make_chat().run(make_call(stream=False, max_tokens=50), ChunkCollector())

    assert reply.content == "Paris."
    assert reply.meta.model == "gpt-4.1-mini"
    (request,) = server.received
    assert request.path == f"/openai/deployments/{DEPLOYMENT}/chat/completions"
    assert request.query == {"api-version": [API_VERSION]}
    assert header(request.headers, "api-key") == AZURE_KEY
    assert header(request.headers, "authorization") is None
    assert request.body["model"] == DEPLOYMENT  # model_name falls back to the deployment
    assert request.body["max_completion_tokens"] == 50


def test_chat_model_name_and_old_api_version(server: FakeHTTPServer, make_chat: Factory) -> None:
    server.queue(Reply(json_body=chat_completion("ok")))

    make_chat(model="gpt-4o", api_version="2024-06-01").run(make_call(stream=False, max_tokens=50), ChunkCollector())

    request = server.received[0]
    assert request.query == {"api-version": ["2024-06-01"]}
    assert request.body["model"] == "gpt-4o"
    assert request.body["max_tokens"] == 50  # API versions before 2024-09-01 lack max_completion_tokens
    assert "max_completion_tokens" not in request.body


def test_chat_streaming_with_prompt_filter_chunks(server: FakeHTTPServer, make_chat: Factory) -> None:
    # Azure first sends a chunk with no choices and an empty model, holding the prompt's filter results.
    prompt_filter = {
        "id": "",
        "object": "",
        "created": 0,
        "model": "",
        "choices": [],
        "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {"hate": {"filtered": False}}}],
    }
    events = [prompt_filter, *chat_stream("Par", "is", usage=(9, 2))]
    events[2]["choices"][0]["content_filter_results"] = {"hate": {"filtered": False, "severity": "safe"}}
    server.queue(Reply(events=events, chunked=True))
    collect = ChunkCollector()

    (reply,) = make_chat().run(make_call(), collect)

    assert collect.text == reply.content == "Paris"
    assert reply.meta.model == "gpt-4.1-mini-2025-04-14"
    assert reply.meta.usage.total_tokens == 11
    assert server.received[0].body["stream_options"] == {"include_usage": True}


def test_ad_token_from_env(server: FakeHTTPServer, make_chat: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURE_AD_TOKEN_FOR_TEST", AD_TOKEN)
    server.queue(Reply(json_body=chat_completion("ok")))

    make_chat(azure_ad_token_env="AZURE_AD_TOKEN_FOR_TEST").run(make_call(stream=False), ChunkCollector())

    request = server.received[0]
    assert header(request.headers, "authorization") == f"Bearer {AD_TOKEN}"
    assert header(request.headers, "api-key") is None


def test_ad_token_provider_imported_once_called_per_request(
    server: FakeHTTPServer, make_chat: Factory, token_module: str
) -> None:
    server.queue(Reply(json_body=chat_completion("a")), Reply(json_body=chat_completion("b")))
    provider = make_chat(azure_ad_token_provider=f"{token_module}:get_token")

    provider.run(make_call(stream=False), ChunkCollector())
    provider.run(make_call(stream=False), ChunkCollector())

    tokens = [header(request.headers, "authorization") for request in server.received]
    assert tokens == ["Bearer provider-token-1", "Bearer provider-token-2"]
    assert all(header(request.headers, "api-key") is None for request in server.received)
    assert sys.modules[token_module].imports == 1


def test_failing_token_provider_is_an_auth_failure(
    server: FakeHTTPServer, make_chat: Factory, token_module: str
) -> None:
    error, _ = run_failing(make_chat(azure_ad_token_provider=f"{token_module}:broken"))

    assert isinstance(error, errors.AuthenticationFailed)
    assert "RuntimeError" in error.message
    assert server.received == []


def test_unimportable_token_provider(server: FakeHTTPServer, make_chat: Factory) -> None:
    error, _ = run_failing(make_chat(azure_ad_token_provider="cascade_no_such_module:get_token"))

    assert isinstance(error, errors.ProviderUnavailable)
    assert server.received == []


def test_no_credential(server: FakeHTTPServer, make_chat: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AZURE_OPENAI_API_KEY")

    error, _ = run_failing(make_chat(azure_ad_token_env="AZURE_AD_TOKEN_UNSET"))

    assert isinstance(error, errors.AuthenticationFailed)
    assert "AZURE_OPENAI_API_KEY" in error.message and "AZURE_AD_TOKEN_UNSET" in error.message
    assert server.received == []


AZURE_ERRORS = [
    pytest.param(
        error_reply(
            429,
            "Requests to the ChatCompletions_Create Operation have exceeded the rate limit.",
            None,
            "429",
            **{"retry-after": "4"},
        ),
        errors.RateLimited,
        id="429",
    ),
    pytest.param(
        error_reply(404, "The API deployment for this resource does not exist.", None, "DeploymentNotFound"),
        errors.UnknownModel,
        id="404-deployment",
    ),
    pytest.param(
        error_reply(401, f"Access denied due to invalid subscription key {AZURE_KEY}.", None, "401"),
        errors.AuthenticationFailed,
        id="401",
    ),
    pytest.param(
        Reply(
            status=400,
            json_body={
                "error": {
                    "message": (
                        "The response was filtered due to the prompt triggering Azure OpenAI's "
                        "content management policy."
                    ),
                    "type": None,
                    "param": "prompt",
                    "code": "content_filter",
                    "status": 400,
                    "innererror": {
                        "code": "ResponsibleAIPolicyViolation",
                        "content_filter_result": {"violence": {"filtered": True}},
                    },
                }
            },
        ),
        errors.ContentFiltered,
        id="400-content-filter",
    ),
    pytest.param(error_reply(503, "Service Unavailable", None, "ServiceUnavailable"), errors.Overloaded, id="503"),
    pytest.param(error_reply(500, "Internal server error", None, "InternalServerError"), errors.ServerError, id="500"),
]


@pytest.mark.parametrize(("reply", "expected"), AZURE_ERRORS)
def test_chat_errors(
    server: FakeHTTPServer, make_chat: Factory, reply: Reply, expected: type[errors.ProviderError]
) -> None:
    server.queue(reply)

    error, _ = run_failing(make_chat())

    assert type(error) is expected
    assert len(server.received) == 1
    assert_no_secret(error, AZURE_KEY)
    if isinstance(error, errors.RateLimited):
        assert error.retry_after_s == 4.0


def test_output_content_filter_mid_stream(server: FakeHTTPServer, make_chat: Factory) -> None:
    server.queue(Reply(events=[chat_chunk("Once"), chat_chunk(" upon", finish_reason="content_filter"), "[DONE]"]))

    error, collect = run_failing(make_chat())

    assert isinstance(error, errors.StreamInterrupted)
    assert isinstance(error.__cause__, errors.ContentFiltered)
    assert collect.text == "Once upon"


def test_ad_token_never_in_errors(server: FakeHTTPServer, make_chat: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURE_AD_TOKEN_FOR_TEST", AD_TOKEN)
    server.queue(error_reply(401, f"Token {AD_TOKEN} is expired", None, "401"))

    error, _ = run_failing(make_chat(azure_ad_token_env="AZURE_AD_TOKEN_FOR_TEST"))

    assert isinstance(error, errors.AuthenticationFailed)
    assert_no_secret(error, AD_TOKEN)


# --- Responses on Azure ------------------------------------------------------------------------


def test_responses_url_layout_and_deployment_as_model(server: FakeHTTPServer, make_responses: Factory) -> None:
    server.queue(responses_answer("Paris", reasoning=["Simple."]))
    collect = ChunkCollector()

    (reply,) = make_responses(model="o4-mini").run(make_call(max_tokens=100), collect)

    assert collect.text == reply.content == "Paris"
    assert reply.meta.model_dump()["reasoning"] == "Simple."
    (request,) = server.received
    assert request.path == "/openai/responses"
    assert request.query == {"api-version": [API_VERSION]}
    assert header(request.headers, "api-key") == AZURE_KEY
    assert request.body["model"] == DEPLOYMENT
    assert request.body["max_output_tokens"] == 100


def test_responses_non_streaming(server: FakeHTTPServer, make_responses: Factory) -> None:
    server.queue(Reply(json_body=response_object(text="Paris.", model="o4-mini")))

    (reply,) = make_responses().run(make_call(stream=False), ChunkCollector())

    assert (reply.content, reply.meta.model) == ("Paris.", "o4-mini")


def test_responses_errors(server: FakeHTTPServer, make_responses: Factory) -> None:
    server.queue(error_reply(429, "Rate limit is exceeded.", None, "429", **{"retry-after-ms": "1200"}))

    error, _ = run_failing(make_responses())

    assert isinstance(error, errors.RateLimited)
    assert error.retry_after_s == 1.2
    assert len(server.received) == 1
    assert_no_secret(error, AZURE_KEY)
