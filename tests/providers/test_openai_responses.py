"""The ``openai_responses`` provider at the wire level: the real ``openai`` SDK talking to a fake
server that speaks the Responses API (a ``response`` JSON object; typed server-sent events with
``event:`` names and sequence numbers; ``response.failed``, ``response.incomplete`` and
``error`` events; cut streams)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from providers import errors
from providers.openai.responses import OpenAIResponsesProvider
from settings.providers import OpenAIResponsesConfig
from tests.providers.openai_wire import (
    API_KEY,
    aim_openai_at,
    assert_no_secret,
    error_reply,
    header,
    lifecycle,
    response_object,
    responses_answer,
    responses_stream,
    summary_delta,
    text_delta,
)
from tests.support.calls import ChunkCollector, make_call, provider_factory, run_failing
from tests.support.fake_http import FakeHTTPServer, Reply

ProviderFactory = Callable[..., OpenAIResponsesProvider]
STARTED = response_object(status="in_progress", usage=None)


@pytest.fixture
def make_provider(server: FakeHTTPServer, monkeypatch: pytest.MonkeyPatch) -> ProviderFactory:
    aim_openai_at(server, monkeypatch)
    return provider_factory("thinker", OpenAIResponsesConfig, OpenAIResponsesProvider, model="o4-mini", max_retries=0)


def test_non_streaming_reply(server: FakeHTTPServer, make_provider: ProviderFactory) -> None:
    body = response_object(text="Paris.", reasoning=["The user asks for a capital."])
    server.queue(Reply(json_body=body))
    collect = ChunkCollector()

    (reply,) = make_provider().run(make_call(stream=False), collect)

    assert reply.content == "Paris."
    assert reply.meta.model == "o4-mini-2025-04-16"
    assert reply.meta.finish_reason == "stop"
    assert (reply.meta.usage.prompt_tokens, reply.meta.usage.completion_tokens, reply.meta.usage.total_tokens) == (
        20,
        7,
        27,
    )
    assert reply.meta.model_extra == {"reasoning": "The user asks for a capital."}
    assert [chunk.content for chunk in collect.chunks] == ["Paris."]
    (request,) = server.received
    assert (request.method, request.path) == ("POST", "/v1/responses")
    assert request.body["model"] == "o4-mini"
    assert request.body["input"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
    ]
    assert "stream" not in request.body
    assert request.body["store"] is False, "Cascade keeps the reply; OpenAI must not"
    assert header(request.headers, "authorization") == f"Bearer {API_KEY}"


def test_streaming_text_and_reasoning_kept_apart(server: FakeHTTPServer, make_provider: ProviderFactory) -> None:
    server.queue(responses_answer("The capital", " is Paris.", reasoning=["Capital ", "of France."]))
    collect = ChunkCollector()

    (reply,) = make_provider().run(make_call(reasoning_summary="auto"), collect)

    # Only the answer goes to on_chunk; the reasoning summary lands in the reply's meta.
    assert [chunk.content for chunk in collect.chunks] == ["The capital", " is Paris."]
    assert reply.content == "The capital is Paris."
    assert reply.meta.model_dump()["reasoning"] == "Capital \n\nof France."
    assert reply.meta.finish_reason == "stop"
    assert (reply.meta.usage.prompt_tokens, reply.meta.usage.completion_tokens) == (20, 7)
    (request,) = server.received
    assert request.body["stream"] is True and request.body["store"] is False
    assert reply.meta.completion_start_time
    assert server.received[0].body["stream"] is True


def test_generation_kwargs_mapping(server: FakeHTTPServer, make_provider: ProviderFactory) -> None:
    server.queue(Reply(json_body=response_object(text="{}")))
    provider = make_provider(generation_kwargs={"reasoning_effort": "low", "top_p": 0.9}, stop_words=["</s>"])
    schema = {"name": "answer", "schema": {"type": "object"}, "strict": True}
    call = make_call(
        stream=False,
        max_tokens=256,
        temperature=0.2,
        reasoning_summary="detailed",
        response_format={"type": "json_schema", "json_schema": schema},
        stop=["\n"],
        seed=3,
        n=1,
        store=True,  # a request cannot ask the vendor to keep the conversation
    )

    provider.run(call, ChunkCollector())

    body = server.received[0].body
    sent = {key: value for key, value in body.items() if key not in ("model", "input")}
    assert sent == {
        "store": False,
        "max_output_tokens": 256,
        "temperature": 0.2,
        "top_p": 0.9,
        "reasoning": {"effort": "low", "summary": "detailed"},
        "text": {"format": {"type": "json_schema", "name": "answer", "schema": {"type": "object"}, "strict": True}},
    }


@pytest.mark.parametrize(
    ("asked", "sent"), [({"max_tokens": 5_000}, 100), ({"max_output_tokens": 5_000}, 100), ({"max_tokens": 40}, 40)]
)
def test_the_entrys_max_output_tokens_caps_the_request(
    server: FakeHTTPServer, make_provider: ProviderFactory, asked: dict[str, int], sent: int
) -> None:
    server.queue(Reply(json_body=response_object(text="ok")))

    make_provider(max_output_tokens=100).run(make_call(stream=False, **asked), ChunkCollector())

    assert server.received[0].body["max_output_tokens"] == sent


def test_incomplete_response_finishes_with_length(server: FakeHTTPServer, make_provider: ProviderFactory) -> None:
    incomplete = response_object(status="incomplete", text="The capital", incomplete_reason="max_output_tokens")
    server.queue(
        responses_stream(
            lifecycle("response.created", STARTED),
            text_delta("The capital"),
            lifecycle("response.incomplete", incomplete),
        )
    )

    (reply,) = make_provider().run(make_call(max_tokens=2), ChunkCollector())

    assert reply.content == "The capital"
    assert reply.meta.finish_reason == "length"


def test_incomplete_for_content_filter_fails(server: FakeHTTPServer, make_provider: ProviderFactory) -> None:
    filtered = response_object(status="incomplete", text="", incomplete_reason="content_filter")
    server.queue(Reply(json_body=filtered))

    error, _ = run_failing(make_provider(), stream=False)

    assert isinstance(error, errors.ContentFiltered)


@pytest.mark.parametrize(
    ("code", "expected"),
    [("server_error", errors.ServerError), ("rate_limit_exceeded", errors.RateLimited)],
)
def test_failed_response_before_text(
    server: FakeHTTPServer, make_provider: ProviderFactory, code: str, expected: type[errors.ProviderError]
) -> None:
    failed = response_object(status="failed", error={"code": code, "message": "The model failed."}, usage=None)
    server.queue(
        responses_stream(
            lifecycle("response.created", STARTED),
            summary_delta("thinking"),
            lifecycle("response.failed", failed),
        )
    )

    error, collect = run_failing(make_provider())

    assert type(error) is expected
    assert code in error.message and "The model failed." in error.message
    assert collect.chunks == []


def test_failed_response_after_text_is_interrupted(server: FakeHTTPServer, make_provider: ProviderFactory) -> None:
    failed = response_object(status="failed", error={"code": "server_error", "message": "boom"}, usage=None)
    server.queue(
        responses_stream(
            lifecycle("response.created", STARTED), text_delta("Par"), lifecycle("response.failed", failed)
        )
    )

    error, collect = run_failing(make_provider())

    assert isinstance(error, errors.StreamInterrupted)
    assert isinstance(error.__cause__, errors.ServerError)
    assert collect.text == "Par"


def test_error_event(server: FakeHTTPServer, make_provider: ProviderFactory) -> None:
    event = {"type": "error", "code": "rate_limit_exceeded", "message": "Rate limit reached", "param": None}
    server.queue(responses_stream(lifecycle("response.created", STARTED), event))

    error, _ = run_failing(make_provider())

    assert isinstance(error, errors.RateLimited)
    assert "Rate limit reached" in error.message


def test_error_event_with_nested_error(server: FakeHTTPServer, make_provider: ProviderFactory) -> None:
    # Some servers nest the error; the SDK raises it itself.
    event = {
        "type": "error",
        "error": {"type": "invalid_request_error", "code": "context_length_exceeded", "message": "Too long"},
    }
    server.queue(responses_stream(lifecycle("response.created", STARTED), event))

    error, _ = run_failing(make_provider())

    assert isinstance(error, errors.ContextLengthExceeded)


def test_stream_cut_after_text(server: FakeHTTPServer, make_provider: ProviderFactory) -> None:
    server.queue(responses_answer("The", " capital", " is Paris."))
    server.replies[-1].cut_after = 4  # created, in_progress, two deltas: no response.completed

    error, collect = run_failing(make_provider())

    assert isinstance(error, errors.StreamInterrupted)
    assert collect.text == "The capital"


def test_stream_cut_before_text(server: FakeHTTPServer, make_provider: ProviderFactory) -> None:
    server.queue(responses_answer("Paris"))
    server.replies[-1].cut_after = 2
    server.replies[-1].chunked = True

    error, collect = run_failing(make_provider())

    assert isinstance(error, errors.ProviderConnectionError)
    assert collect.chunks == []


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (
            error_reply(429, "Rate limit reached", "requests", "rate_limit_exceeded", **{"retry-after-ms": "800"}),
            errors.RateLimited,
        ),
        (
            error_reply(
                400, "Your input exceeds the context window", "invalid_request_error", "context_length_exceeded"
            ),
            errors.ContextLengthExceeded,
        ),
        (
            error_reply(401, f"Incorrect API key provided: {API_KEY}", "invalid_request_error", "invalid_api_key"),
            errors.AuthenticationFailed,
        ),
        (error_reply(500, "The server had an error", "server_error"), errors.ServerError),
    ],
    ids=["429", "400-context", "401", "500"],
)
def test_http_errors(
    server: FakeHTTPServer, make_provider: ProviderFactory, reply: Reply, expected: type[errors.ProviderError]
) -> None:
    server.queue(reply)

    error, _ = run_failing(make_provider())

    assert type(error) is expected
    assert len(server.received) == 1
    assert_no_secret(error, API_KEY)
    if isinstance(error, errors.RateLimited):
        assert error.retry_after_s == 0.8


def test_slow_first_text_hits_first_chunk_timeout(server: FakeHTTPServer, make_provider: ProviderFactory) -> None:
    reply = responses_answer("late")
    reply.event_delay_s = 10  # response.created at once, then nothing for 10 s
    server.queue(reply)

    error, collect = run_failing(make_provider(first_chunk_timeout_s=0.2))

    assert isinstance(error, errors.ProviderTimeout)
    assert collect.chunks == []


def test_request_deadline(server: FakeHTTPServer, make_provider: ProviderFactory) -> None:
    server.queue(Reply(json_body=response_object(text="late"), delay_s=10))

    error, _ = run_failing(make_provider(), stream=False, deadline_s=0.2)

    assert isinstance(error, errors.DeadlineExceeded)
