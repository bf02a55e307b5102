"""The ``openai`` provider at the wire level: the real ``openai`` SDK talking to a fake server
that speaks Chat Completions (``chat.completion`` JSON, ``chat.completion.chunk`` events, the
usage-only last chunk, ``data: [DONE]``, OpenAI's error bodies, cut connections).

The provider under test targets "OpenAI" through ``OPENAI_BASE_URL`` (no ``api_base_url`` in
its config), so it behaves as it would against api.openai.com.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from providers import errors
from providers.base import StreamingChunk
from providers.chain import ChainRun
from providers.openai.chat import OpenAIChatProvider
from settings.providers import OpenAIConfig
from tests.providers.openai_wire import (
    API_KEY,
    MODEL,
    aim_openai_at,
    assert_no_secret,
    chat_chunk,
    chat_completion,
    chat_stream,
    error_reply,
    header,
    usage_chunk,
)
from tests.support.calls import MESSAGES, ChainRecorder, ChunkCollector, make_call, provider_factory, run_failing
from tests.support.fake_http import FakeHTTPServer, Reply
from worker.demo.local import free_port

ProviderFactory = Callable[..., OpenAIChatProvider]


@pytest.fixture
def make_provider(server: FakeHTTPServer, monkeypatch: pytest.MonkeyPatch) -> ProviderFactory:
    """Build an ``openai`` provider aimed at the fake server as if it were OpenAI."""
    aim_openai_at(server, monkeypatch)
    return provider_factory("primary", OpenAIConfig, OpenAIChatProvider, model="gpt-4.1-mini", max_retries=0)


# --- success -------------------------------------------------------------------------------


def test_non_streaming_reply_and_single_on_chunk(server: FakeHTTPServer, make_provider: ProviderFactory) -> None:
    server.queue(Reply(json_body=chat_completion("Paris.")))
    collect = ChunkCollector()

    replies = make_provider().run(make_call(stream=False), collect)

    assert [reply.content for reply in replies] == ["Paris."]
    meta = replies[0].meta
    assert (meta.model, meta.index, meta.finish_reason) == (MODEL, 0, "stop")
    assert (meta.usage.prompt_tokens, meta.usage.completion_tokens, meta.usage.total_tokens) == (12, 3, 15)
    assert meta.completion_start_time
    # One on_chunk with the whole text, so the runner still sees the answer arrive.
    assert [chunk.content for chunk in collect.chunks] == ["Paris."]
    (request,) = server.received
    assert (request.method, request.path) == ("POST", "/v1/chat/completions")
    assert "stream" not in request.body and "stream_options" not in request.body
    assert request.body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
    ]
    assert header(request.headers, "authorization") == f"Bearer {API_KEY}"


def test_streaming_deltas_usage_and_meta(server: FakeHTTPServer, make_provider: ProviderFactory) -> None:
    server.queue(Reply(events=chat_stream("The capital", " is", " Paris."), event_delay_s=0.001))
    collect = ChunkCollector()

    (reply,) = make_provider().run(make_call(), collect)

    # The role-only first chunk and the empty finish chunk are not chunks of text.
    assert [chunk.content for chunk in collect.chunks] == ["The capital", " is", " Paris."]
    assert all(chunk.index == 0 and chunk.meta["model"] == MODEL for chunk in collect.chunks)
    assert reply.content == "The capital is Paris."
    assert reply.meta.finish_reason == "stop"
    assert (reply.meta.usage.prompt_tokens, reply.meta.usage.completion_tokens) == (12, 3)
    assert reply.meta.completion_start_time
    (request,) = server.received
    assert request.body["stream"] is True
    assert request.body["stream_options"] == {"include_usage": True}
    assert request.body["model"] == "gpt-4.1-mini"


def test_streaming_several_choices_keep_their_index(server: FakeHTTPServer, make_provider: ProviderFactory) -> None:
    events = [
        chat_chunk("Par", index=0),
        chat_chunk("Lyo", index=1),
        chat_chunk("is", index=0, finish_reason="stop"),
        chat_chunk("n", index=1, finish_reason="length"),
        usage_chunk(12, 4),
        "[DONE]",
    ]
    server.queue(Reply(events=events))
    collect = ChunkCollector()

    replies = make_provider().run(make_call(n=2), collect)

    assert [(reply.meta.index, reply.content, reply.meta.finish_reason) for reply in replies] == [
        (0, "Paris", "stop"),
        (1, "Lyon", "length"),
    ]
    assert [chunk.index for chunk in collect.chunks] == [0, 1, 0, 1]
    assert server.received[0].body["n"] == 2


# --- generation kwargs on the wire -----------------------------------------------------------


def test_generation_kwargs_mapping(server: FakeHTTPServer, make_provider: ProviderFactory) -> None:
    server.queue(Reply(json_body=chat_completion("ok")))
    provider = make_provider(
        generation_kwargs={"temperature": 0.1, "top_p": 0.5, "seed": 1},
        stop_words=["</s>"],
        organization="org-test",
        project="proj-test",
    )
    call = make_call(
        stream=False,
        max_tokens=64,
        temperature=0.7,
        stop=["\n\n"],
        presence_penalty=0.5,
        frequency_penalty=0.25,
        logit_bias={"50256": -100},
        seed=7,
        response_format={"type": "json_object"},
        best_of=3,
        tools=["not forwarded"],
    )

    provider.run(call, ChunkCollector())

    body = server.received[0].body
    sent = {key: value for key, value in body.items() if key not in ("model", "messages")}
    assert sent == {
        "max_completion_tokens": 64,  # OpenAI: reasoning models reject max_tokens
        "temperature": 0.7,  # the request wins over the provider's defaults
        "top_p": 0.5,
        "seed": 7,
        "stop": ["\n\n", "</s>"],
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "logit_bias": {"50256": -100},
        "response_format": {"type": "json_object"},
    }
    assert header(server.received[0].headers, "openai-organization") == "org-test"
    assert header(server.received[0].headers, "openai-project") == "proj-test"


@pytest.mark.parametrize(
    ("asked", "sent"),
    [({"max_tokens": 5_000}, 100), ({"max_completion_tokens": 5_000}, 100), ({"max_tokens": 40}, 40), ({}, 100)],
)
def test_the_entrys_max_output_tokens_caps_the_request(
    server: FakeHTTPServer, make_provider: ProviderFactory, asked: dict[str, int], sent: int
) -> None:
    """Operator limits win: a request may ask for fewer tokens than the entry's cap, never more,
    and one that names no limit is sent the cap."""
    server.queue(Reply(json_body=chat_completion("ok")))

    make_provider(max_output_tokens=100).run(make_call(stream=False, **asked), ChunkCollector())

    body = server.received[0].body
    assert body["max_completion_tokens"] == sent and "max_tokens" not in body


def test_custom_server_gets_max_tokens(server: FakeHTTPServer, make_provider: ProviderFactory) -> None:
    server.queue(Reply(json_body=chat_completion("ok")))

    make_provider(api_base_url=f"{server.url}/v1").run(make_call(stream=False, max_tokens=32), ChunkCollector())

    body = server.received[0].body
    assert body["max_tokens"] == 32
    assert "max_completion_tokens" not in body


def test_custom_server_without_key(server: FakeHTTPServer, make_provider: ProviderFactory) -> None:
    server.queue(Reply(json_body=chat_completion("ok")))
    provider = make_provider(api_base_url=f"{server.url}/v1", api_key_env="LOCAL_SERVER_KEY_UNSET")

    (reply,) = provider.run(make_call(stream=False), ChunkCollector())

    assert reply.content == "ok"


def test_missing_key_fails_the_call_not_the_worker(
    make_provider: ProviderFactory, server: FakeHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY")
    provider = make_provider()  # building it must not raise

    error, _ = run_failing(provider)

    assert isinstance(error, errors.AuthenticationFailed)
    assert "OPENAI_API_KEY" in error.message
    assert server.received == []


# --- HTTP errors ---------------------------------------------------------------------------

CONTEXT_MESSAGE = "This model's maximum context length is 128000 tokens. However, you requested 130000 tokens."
# (status, message, type, code) as OpenAI sends them, and the taxonomy class they map to.
HTTP_ERRORS: list[tuple[int, str, str | None, str | None, type[errors.ProviderError]]] = [
    (500, "The server had an error", "server_error", None, errors.ServerError),
    (502, "Bad gateway", "server_error", None, errors.ServerError),
    (503, "The engine is currently overloaded", None, None, errors.Overloaded),
    (529, "Overloaded", "overloaded_error", None, errors.Overloaded),
    (
        401,
        f"Incorrect API key provided: {API_KEY}.",
        "invalid_request_error",
        "invalid_api_key",
        errors.AuthenticationFailed,
    ),
    (403, "Project does not have access", "invalid_request_error", None, errors.AuthenticationFailed),
    (404, "The model `gpt-9` does not exist", "invalid_request_error", "model_not_found", errors.UnknownModel),
    (400, CONTEXT_MESSAGE, "invalid_request_error", "context_length_exceeded", errors.ContextLengthExceeded),
    (400, "The prompt triggered a content policy.", None, "content_filter", errors.ContentFiltered),
    (400, "Invalid value for 'temperature'", "invalid_request_error", "invalid_value", errors.BadProviderRequest),
    (422, "Unprocessable", "invalid_request_error", None, errors.BadProviderRequest),
]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "no-stream"])
@pytest.mark.parametrize(
    ("status", "message", "type_", "code", "expected"), HTTP_ERRORS, ids=[f"{e[0]}-{e[4].code}" for e in HTTP_ERRORS]
)
def test_http_errors_map_to_the_taxonomy_with_one_request(
    server: FakeHTTPServer,
    make_provider: ProviderFactory,
    status: int,
    message: str,
    type_: str | None,
    code: str | None,
    expected: type[errors.ProviderError],
    stream: bool,
) -> None:
    server.queue(error_reply(status, message, type_, code))

    error, collect = run_failing(make_provider(), stream=stream)

    assert type(error) is expected
    assert str(status) in error.message
    assert collect.chunks == []
    assert len(server.received) == 1  # max_retries=0: Cascade's retries are the only ones
    assert_no_secret(error, API_KEY)
    if isinstance(error, errors.ServerError):
        assert error.status_code == status


@pytest.mark.parametrize(
    ("headers", "expected"),
    [({"retry-after": "7"}, 7.0), ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5), ({}, None)],
    ids=["seconds", "milliseconds", "absent"],
)
def test_rate_limit_carries_retry_after(
    server: FakeHTTPServer, make_provider: ProviderFactory, headers: dict[str, str], expected: float | None
) -> None:
    body = {"error": {"message": "Rate limit reached for requests", "type": "requests", "code": "rate_limit_exceeded"}}
    server.queue(Reply(status=429, json_body=body, headers=headers))

    error, _ = run_failing(make_provider())

    assert isinstance(error, errors.RateLimited)
    assert error.retry_after_s == expected
    assert "429" in error.message and "rate_limit_exceeded" in error.message
    assert len(server.received) == 1


def test_connection_refused(make_provider: ProviderFactory) -> None:
    provider = make_provider(api_base_url=f"http://127.0.0.1:{free_port()}/v1")  # nothing listens there

    error, _ = run_failing(provider)

    assert isinstance(error, errors.ProviderConnectionError)
    assert_no_secret(error, API_KEY)


# --- broken streams ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "framing",
    [{}, {"chunked": True}, {"chunked": True, "reset": True}],
    ids=["eof", "chunked-incomplete", "tcp-reset"],
)
def test_stream_cut_after_chunks_is_interrupted(
    server: FakeHTTPServer, make_provider: ProviderFactory, framing: dict[str, Any]
) -> None:
    server.queue(Reply(events=chat_stream("The", " capital", " is"), cut_after=3, **framing))

    error, collect = run_failing(make_provider())

    received = [chunk.content for chunk in collect.chunks]
    if framing.get("reset") and received != ["The", " capital"]:
        # A reset discards what the client had not read yet (on a busy machine, some chunks):
        # what arrived is a prefix, and the failure is still a failure, never a success.
        assert received in ([], ["The"])
        assert isinstance(error, errors.StreamInterrupted if received else errors.ProviderConnectionError)
    else:
        assert isinstance(error, errors.StreamInterrupted)
        assert received == ["The", " capital"]
    assert len(server.received) == 1


def test_stream_cut_before_any_chunk_is_a_connection_error(
    server: FakeHTTPServer, make_provider: ProviderFactory
) -> None:
    server.queue(Reply(events=chat_stream("Paris"), cut_after=1))  # only the role chunk

    error, collect = run_failing(make_provider())

    assert isinstance(error, errors.ProviderConnectionError)
    assert collect.chunks == []


def test_stream_without_finish_reason_is_incomplete(server: FakeHTTPServer, make_provider: ProviderFactory) -> None:
    server.queue(Reply(events=[chat_chunk("Par"), chat_chunk("is"), "[DONE]"]))

    error, collect = run_failing(make_provider())

    assert isinstance(error, errors.StreamInterrupted)
    assert collect.text == "Paris"


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (
            {"message": "The server had an error while processing your request.", "type": "server_error"},
            errors.ServerError,
        ),
        ({"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}, errors.RateLimited),
        (
            {"message": "maximum context length is 8192 tokens", "type": "invalid_request_error"},
            errors.ContextLengthExceeded,
        ),
    ],
    ids=["server_error", "rate_limit", "context_length"],
)
def test_error_event_inside_a_200_stream_before_chunks(
    server: FakeHTTPServer,
    make_provider: ProviderFactory,
    payload: dict[str, Any],
    expected: type[errors.ProviderError],
) -> None:
    server.queue(Reply(events=[chat_chunk("", role="assistant"), {"error": payload}]))

    error, collect = run_failing(make_provider())

    assert type(error) is expected
    assert payload["message"] in error.message
    assert collect.chunks == []


def test_error_event_after_chunks_is_interrupted(server: FakeHTTPServer, make_provider: ProviderFactory) -> None:
    error_event = {"error": {"message": f"Internal failure for key {API_KEY}", "type": "server_error"}}
    server.queue(Reply(events=[chat_chunk("The"), chat_chunk(" capital"), error_event, chat_chunk(" is")]))

    error, collect = run_failing(make_provider())

    assert isinstance(error, errors.StreamInterrupted)
    assert isinstance(error.__cause__, errors.ServerError)
    assert collect.text == "The capital"
    assert_no_secret(error, API_KEY)


def test_content_filter_finish(server: FakeHTTPServer, make_provider: ProviderFactory) -> None:
    server.queue(Reply(json_body=chat_completion("", finish_reason="content_filter")))

    error, collect = run_failing(make_provider(), stream=False)

    assert isinstance(error, errors.ContentFiltered)
    assert collect.chunks == []


def test_content_filter_finish_after_chunks(server: FakeHTTPServer, make_provider: ProviderFactory) -> None:
    server.queue(Reply(events=chat_stream("Once", " upon", finish_reason="content_filter")))

    error, collect = run_failing(make_provider())

    assert isinstance(error, errors.StreamInterrupted)
    assert isinstance(error.__cause__, errors.ContentFiltered)
    assert collect.text == "Once upon"


# --- limits --------------------------------------------------------------------------------


def test_slow_response_headers_hit_first_chunk_timeout(server: FakeHTTPServer, make_provider: ProviderFactory) -> None:
    # The server thinks for 10 s before answering; the read timeout gives up at 0.2 s.
    server.queue(Reply(events=chat_stream("late"), delay_s=10))

    error, _ = run_failing(make_provider(first_chunk_timeout_s=0.2))

    assert isinstance(error, errors.ProviderTimeout)
    assert len(server.received) == 1


def test_slow_first_text_after_headers_hits_first_chunk_timeout(
    server: FakeHTTPServer, make_provider: ProviderFactory
) -> None:
    # Headers and the role chunk arrive at once, the first text 10 s later: the stream is
    # ended (by the guard's socket shutdown or the read timeout, whichever wakes first) when
    # first_chunk_timeout_s passes; a role-only chunk is not a first chunk.
    events = [chat_chunk("", role="assistant"), *chat_stream("late")[1:]]
    server.queue(Reply(events=events, event_delay_s=10))

    error, collect = run_failing(make_provider(first_chunk_timeout_s=0.2))

    assert isinstance(error, errors.ProviderTimeout)
    assert collect.chunks == []


def test_whole_call_timeout_after_chunks(server: FakeHTTPServer, make_provider: ProviderFactory) -> None:
    # One chunk at once, the next 10 s later: timeout_s ends the call mid-stream.
    server.queue(Reply(events=[chat_chunk("The"), chat_chunk(" is"), *chat_stream("!")[1:]], event_delay_s=10))

    error, collect = run_failing(make_provider(timeout_s=0.3))

    assert isinstance(error, errors.StreamInterrupted)
    assert isinstance(error.__cause__, errors.ProviderTimeout)
    assert collect.text == "The"


def test_request_deadline_while_waiting(server: FakeHTTPServer, make_provider: ProviderFactory) -> None:
    server.queue(Reply(events=chat_stream("late"), delay_s=10))

    error, _ = run_failing(make_provider(), deadline_s=0.2)

    assert isinstance(error, errors.DeadlineExceeded)


def test_request_deadline_mid_stream(server: FakeHTTPServer, make_provider: ProviderFactory) -> None:
    server.queue(Reply(events=[chat_chunk("The"), chat_chunk(" is"), *chat_stream("!")[1:]], event_delay_s=10))

    error, collect = run_failing(make_provider(), deadline_s=0.3)

    assert isinstance(error, errors.DeadlineExceeded)  # a stop, never wrapped as a provider failure
    assert collect.text == "The"


def test_deadline_already_passed_sends_nothing(server: FakeHTTPServer, make_provider: ProviderFactory) -> None:
    error, _ = run_failing(make_provider(), deadline_s=-1)

    assert isinstance(error, errors.DeadlineExceeded)
    assert server.received == []


def test_on_chunk_exceptions_propagate_unchanged(server: FakeHTTPServer, make_provider: ProviderFactory) -> None:
    server.queue(Reply(events=chat_stream("a", "b", "c")))

    def cancel(chunk: StreamingChunk) -> None:
        raise errors.Cancelled("cancelled by the producer")

    with pytest.raises(errors.Cancelled):
        make_provider().run(make_call(), cancel)


def test_client_is_built_once(server: FakeHTTPServer, make_provider: ProviderFactory) -> None:
    server.queue(Reply(json_body=chat_completion("a")), Reply(json_body=chat_completion("b")))
    provider = make_provider()

    provider.run(make_call(stream=False), ChunkCollector())
    first = provider.client()
    provider.run(make_call(stream=False), ChunkCollector())

    assert provider.client() is first
    assert len(server.received) == 2


# --- in the chain ----------------------------------------------------------------------------


def test_chain_retries_honour_retry_after_then_fall_back_after_a_cut(
    server: FakeHTTPServer, make_provider: ProviderFactory
) -> None:
    # Attempt 1: 429 (retried after its Retry-After); attempt 2: a stream cut after one chunk
    # (not retried: a fallback); the second provider answers.
    server.queue(
        error_reply(429, "Rate limit reached", "requests", "rate_limit_exceeded", **{"retry-after": "0.01"}),
        Reply(events=chat_stream("Par", "is"), cut_after=2),
        Reply(events=chat_stream("Paris")),
    )
    waits: list[float] = []
    listener = ChainRecorder()
    run = ChainRun(
        providers=[make_provider(max_retries=3, backoff_initial_s=0, backoff_max_s=0), make_provider()],
        messages=MESSAGES,
        generation_kwargs={},
        deadline=time.monotonic() + 10,
        listener=listener,
        wait=waits.append,
    )

    outcome = run.execute()

    assert [reply.content for reply in outcome.replies] == ["Paris"]
    assert outcome.succeeded_index == 1
    assert waits == [0.01]
    assert [(r.error_type, r.chunks) for r in run.attempts] == [
        ("rate_limited", 0),
        ("stream_interrupted", 1),
        (None, 1),
    ]
    assert [record.attempt for record in listener.failed] == [1, 2]
    assert len(server.received) == 3
