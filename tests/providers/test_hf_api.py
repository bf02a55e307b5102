"""The ``hf_api`` provider at the wire level: huggingface_hub's real ``InferenceClient`` talking to
a fake server that speaks TGI's Messages API (``/v1/chat/completions``: chat.completion JSON,
chat.completion.chunk server-sent events ending with ``data: [DONE]``, and TGI's error bodies
``{"error": ..., "error_type": ...}``).

Serverless (Inference Providers) URLs are fixed in huggingface_hub (``router.huggingface.co``),
so those tests install an ``httpx2`` transport that sends every request to the fake server,
keeping the original ``Host`` header, and check both the Hub mapping lookup and the routed call.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx2
import pytest
from huggingface_hub import constants, set_client_factory
from huggingface_hub.inference._providers._common import _fetch_inference_provider_mapping
from huggingface_hub.utils._http import default_client_factory, hf_request_event_hook

from providers import errors
from providers.base import ProviderCall, StreamingChunk
from providers.chain import ChainRun
from providers.huggingface import api as hf_api
from providers.huggingface.api import HfApiProvider, translate_hf_error
from providers.registry import build_provider
from settings.providers import HfApiConfig
from tests.providers.tgi_wire import MODEL, chunk, completion, streamed, tgi_error, usage, usage_chunk
from tests.support.calls import MESSAGES, ChainRecorder, ChunkCollector, make_call
from tests.support.fake_http import FakeHTTPServer, Reply
from worker.demo.local import free_port

TOKEN = "hf_TestTokenDoNotLeak0123456789"
CONTEXT_ERROR = (
    "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. "
    "Given: 4000 `inputs` tokens and 200 `max_new_tokens`"
)


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_ambient_token(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HF_API_TOKEN", "HF_TOKEN", "TGI_KEY"):
        monkeypatch.delenv(name, raising=False)


def tgi(url: str, **fields: Any) -> HfApiProvider:
    """An ``hf_api`` provider for the TGI server at ``url``."""
    return HfApiProvider("tgi", HfApiConfig(api_type="text_generation_inference", url=url, **fields))


def fail(provider: HfApiProvider, call: ProviderCall, on_chunk: ChunkCollector | None = None) -> BaseException:
    """The exception ``provider.run`` raises (it must raise)."""
    with pytest.raises(BaseException) as caught:
        provider.run(call, on_chunk or ChunkCollector())
    return caught.value


# --- success -------------------------------------------------------------------------------


def test_non_streaming_reply_and_meta(server: FakeHTTPServer) -> None:
    server.queue(Reply(json_body=completion("Paris.", tokens=(21, 3))))
    chunks = ChunkCollector()

    replies = tgi(server.url).run(make_call(stream=False), chunks)

    assert [reply.content for reply in replies] == ["Paris."]
    meta = replies[0].meta
    assert (meta.model, meta.index, meta.finish_reason) == (MODEL, 0, "stop")
    assert meta.usage.model_dump() == usage(21, 3)
    assert meta.completion_start_time is not None
    assert chunks.chunks == []
    [request] = server.received
    assert (request.method, request.path) == ("POST", "/v1/chat/completions")
    assert request.body["stream"] is False
    assert request.body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
    ]


def test_streaming_deltas_reach_on_chunk(server: FakeHTTPServer) -> None:
    server.queue(streamed("The capital", " of France", " is Paris."))
    chunks = ChunkCollector()

    [reply] = tgi(server.url).run(make_call(), chunks)

    assert [chunk.content for chunk in chunks.chunks] == ["The capital", " of France", " is Paris."]
    assert [chunk.meta["finish_reason"] for chunk in chunks.chunks] == [None, None, "stop"]
    assert all(chunk.meta["model"] == MODEL and chunk.index == 0 for chunk in chunks.chunks)
    assert reply.content == "The capital of France is Paris."
    assert (reply.meta.model, reply.meta.finish_reason) == (MODEL, "stop")
    assert reply.meta.usage.model_dump() == usage(21, 3)
    assert reply.meta.completion_start_time is not None
    [request] = server.received
    assert request.path == "/v1/chat/completions"
    assert request.body["stream"] is True
    assert request.body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    ("tgi_reason", "expected"),
    [("eos_token", "stop"), ("stop", "stop"), ("stop_sequence", "stop"), ("length", "length")],
)
@pytest.mark.parametrize("stream", [True, False])
def test_finish_reasons_mapped_as_haystack_does(
    server: FakeHTTPServer, tgi_reason: str, expected: str, stream: bool
) -> None:
    if stream:
        # TGI 2 style: usage on the last token's chunk, no separate usage chunk.
        events = [chunk("Paris"), chunk(".", tgi_reason, usage=usage(9, 2)), "[DONE]"]
        server.queue(Reply(events=events, chunked=True))
    else:
        server.queue(Reply(json_body=completion("Paris.", finish=tgi_reason, tokens=(9, 2))))

    [reply] = tgi(server.url).run(make_call(stream=stream), ChunkCollector())

    assert reply.meta.finish_reason == expected
    assert reply.meta.usage.model_dump() == usage(9, 2)


@pytest.mark.parametrize("last", [None, ""])
def test_finish_on_a_chunk_without_text(server: FakeHTTPServer, last: str | None) -> None:
    """TGI sends the end-of-sequence token (a special token) with no text, only its finish_reason."""
    events = [chunk("Paris"), chunk("."), chunk(last, "eos_token"), usage_chunk(9, 3), "[DONE]"]
    server.queue(Reply(events=events, chunked=True))
    chunks = ChunkCollector()

    [reply] = tgi(server.url).run(make_call(), chunks)

    assert [chunk.content for chunk in chunks.chunks] == ["Paris", "."]
    assert (reply.content, reply.meta.finish_reason) == ("Paris.", "stop")
    assert reply.meta.usage.model_dump() == usage(9, 3)


def test_usage_stays_zero_when_tgi_sends_none(server: FakeHTTPServer) -> None:
    server.queue(Reply(events=[chunk("Hi"), chunk("!", "eos_token"), "[DONE]"], chunked=True))

    [reply] = tgi(server.url).run(make_call(), ChunkCollector())

    assert reply.content == "Hi!"
    assert reply.meta.usage.model_dump() == usage(0, 0)


def test_generation_kwargs_on_the_wire(server: FakeHTTPServer) -> None:
    server.queue(streamed("ok"))
    provider = tgi(
        server.url,
        model="tgi",
        stop_words=["###"],
        generation_kwargs={"temperature": 0.2, "max_tokens": 50, "top_k": 5},
    )
    call = make_call(
        max_tokens=20,
        top_p=0.9,
        stop=["\n\n"],
        seed=7,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        response_format={"type": "json", "value": {"type": "object"}},
        best_of=2,  # not a chat_completion argument: dropped
    )

    provider.run(call, ChunkCollector())

    [request] = server.received
    assert request.path == "/v1/chat/completions"
    assert request.body == {
        "model": "tgi",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
        ],
        "frequency_penalty": 0.25,
        "max_tokens": 20,
        "presence_penalty": 0.5,
        "response_format": {"type": "json", "value": {"type": "object"}},
        "seed": 7,
        "stop": ["\n\n", "###"],
        "temperature": 0.2,
        "top_p": 0.9,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


@pytest.mark.parametrize(
    ("asked", "sent"),
    [({"max_tokens": 5_000}, 100), ({"max_new_tokens": 5_000}, 100), ({"max_tokens": 40}, 40), ({}, 100)],
)
def test_the_entrys_max_output_tokens_caps_the_request(
    server: FakeHTTPServer, asked: dict[str, int], sent: int
) -> None:
    server.queue(Reply(json_body=completion("ok")))

    tgi(server.url, max_output_tokens=100).run(make_call(stream=False, **asked), ChunkCollector())

    assert server.received[0].body["max_tokens"] == sent


def test_url_with_v1_suffix_keeps_the_messages_api_path(server: FakeHTTPServer) -> None:
    server.queue(Reply(json_body=completion("ok")))

    HfApiProvider("ep", HfApiConfig(api_type="inference_endpoints", url=f"{server.url}/v1/")).run(
        make_call(stream=False), ChunkCollector()
    )

    assert server.received[0].path == "/v1/chat/completions"


def test_token_sent_as_bearer(server: FakeHTTPServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TGI_KEY", TOKEN)
    server.queue(Reply(json_body=completion("ok")))

    tgi(server.url, api_key_env="TGI_KEY").run(make_call(stream=False), ChunkCollector())

    headers = {name.lower(): value for name, value in server.received[0].headers.items()}
    assert headers["authorization"] == f"Bearer {TOKEN}"


@pytest.mark.parametrize("env_name", ["HF_TOKEN", "HF_API_TOKEN"])
def test_a_hugging_face_token_never_goes_to_a_self_hosted_url(
    server: FakeHTTPServer, monkeypatch: pytest.MonkeyPatch, env_name: str
) -> None:
    """A TGI server or endpoint on a host of its own gets no Hugging Face token: neither the
    ones Cascade reads by default nor the one huggingface_hub would add by itself."""
    monkeypatch.setenv(env_name, TOKEN)
    server.queue(Reply(json_body=completion("ok")), Reply(json_body=completion("ok")))

    tgi(server.url).run(make_call(stream=False), ChunkCollector())
    endpoint = HfApiProvider("ep", HfApiConfig(api_type="inference_endpoints", url=server.url))
    endpoint.run(make_call(stream=False), ChunkCollector())

    for request in server.received:
        assert "authorization" not in {name.lower() for name in request.headers}


def test_a_self_hosted_url_gets_the_key_its_entry_names(
    server: FakeHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_API_TOKEN", TOKEN)
    server.queue(Reply(json_body=completion("ok")))

    tgi(server.url, api_key_env="HF_API_TOKEN").run(make_call(stream=False), ChunkCollector())

    headers = {name.lower(): value for name, value in server.received[0].headers.items()}
    assert headers["authorization"] == f"Bearer {TOKEN}"


def test_no_token_no_authorization_header(server: FakeHTTPServer) -> None:
    server.queue(Reply(json_body=completion("ok")))

    tgi(server.url).run(make_call(stream=False), ChunkCollector())

    assert "authorization" not in {name.lower() for name in server.received[0].headers}


def test_registry_builds_it() -> None:
    config = HfApiConfig(api_type="text_generation_inference", url="http://127.0.0.1:1")
    assert isinstance(build_provider("tgi", config), HfApiProvider)


# --- errors --------------------------------------------------------------------------------

ERROR_CASES: list[tuple[int, Any, dict[str, str], type[errors.ProviderError]]] = [
    (429, tgi_error("Model is overloaded", "overloaded"), {"Retry-After": "3"}, errors.RateLimited),
    (500, tgi_error("Incomplete generation", "incomplete_generation"), {}, errors.ServerError),
    (502, {"error": "Bad Gateway"}, {}, errors.ServerError),
    (424, tgi_error("Request failed during generation: Server error: CUDA OOM", "generation"), {}, errors.ServerError),
    (503, {"error": f"Model {MODEL} is currently loading", "estimated_time": 20.0}, {}, errors.Overloaded),
    (503, {"error": "Service Unavailable"}, {}, errors.ServerError),
    (401, {"error": f"Invalid credentials in Authorization header: Bearer {TOKEN}"}, {}, errors.AuthenticationFailed),
    (403, {"error": "Forbidden"}, {}, errors.AuthenticationFailed),
    (404, {"error": "Model not found"}, {}, errors.UnknownModel),
    (422, tgi_error(CONTEXT_ERROR, "validation"), {}, errors.ContextLengthExceeded),
    (
        422,
        tgi_error("Input validation error: `inputs` must have less than 4096 tokens. Given: 5000", "validation"),
        {},
        errors.ContextLengthExceeded,
    ),
    (
        422,
        tgi_error("Input validation error: `temperature` must be strictly positive", "validation"),
        {},
        errors.BadProviderRequest,
    ),
    (422, tgi_error("Template error: template not found", "template_error"), {}, errors.BadProviderRequest),
    (400, {"error": "Failed to deserialize the JSON body"}, {}, errors.BadProviderRequest),
    (413, {"error": "Payload Too Large"}, {}, errors.ContextLengthExceeded),
]


@pytest.mark.parametrize(("status", "body", "headers", "expected"), ERROR_CASES)
@pytest.mark.parametrize("stream", [True, False])
def test_error_statuses(
    server: FakeHTTPServer,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    body: Any,
    headers: dict[str, str],
    expected: type[errors.ProviderError],
    stream: bool,
) -> None:
    monkeypatch.setenv("HF_API_TOKEN", TOKEN)
    server.queue(Reply(status=status, json_body=body, headers=headers))

    exc = fail(tgi(server.url), make_call(stream=stream))

    assert type(exc) is expected
    assert f"HTTP {status}" in str(exc)
    assert TOKEN not in str(exc)
    if isinstance(exc, errors.ServerError):
        assert exc.status_code == status
    if isinstance(exc, errors.RateLimited):
        assert exc.retry_after_s == 3.0
    assert len(server.received) == 1  # no hidden retry inside huggingface_hub


def test_rate_limit_without_retry_after(server: FakeHTTPServer) -> None:
    server.queue(Reply(status=429, json_body=tgi_error("Model is overloaded", "overloaded")))

    exc = fail(tgi(server.url), make_call())

    assert isinstance(exc, errors.RateLimited)
    assert exc.retry_after_s is None


def test_connection_refused() -> None:
    exc = fail(tgi(f"http://127.0.0.1:{free_port()}"), make_call())  # nothing listens there

    assert isinstance(exc, errors.ProviderConnectionError)


def test_offline_mode_makes_it_unavailable(server: FakeHTTPServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    exc = fail(tgi(server.url), make_call())

    assert isinstance(exc, errors.ProviderUnavailable)
    assert server.received == []


def test_one_request_per_call_and_tenacity_is_the_only_retry(server: FakeHTTPServer) -> None:
    """Two 503s then an answer: the chain retries; each of its three calls is one request."""
    overloaded = Reply(status=503, json_body={"error": f"Model {MODEL} is currently loading"})
    server.queue(overloaded, overloaded, streamed("Paris."))
    listener = ChainRecorder()

    provider = tgi(server.url, max_retries=2, backoff_initial_s=0, backoff_max_s=0)
    run = ChainRun(
        providers=[provider],
        messages=MESSAGES,
        generation_kwargs={},
        deadline=time.monotonic() + 10,
        listener=listener,
        wait=lambda seconds: None,
    )

    outcome = run.execute()

    assert [reply.content for reply in outcome.replies] == ["Paris."]
    assert [record.error_type for record in listener.failed] == ["overloaded", "overloaded"]
    assert len(server.received) == 3


# --- broken streams ------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [True, False])
def test_stream_cut_midway_is_interrupted(server: FakeHTTPServer, chunked: bool) -> None:
    """No finish_reason, no [DONE]: with chunked framing httpx2 sees an incomplete body; without
    it the connection just closes, and only the missing finish_reason tells."""
    events = [chunk("The capital"), chunk(" of France"), chunk(" is"), chunk(" Paris.", "eos_token"), "[DONE]"]
    server.queue(Reply(events=events, cut_after=2, chunked=chunked))
    chunks = ChunkCollector()

    exc = fail(tgi(server.url), make_call(), chunks)

    assert isinstance(exc, errors.StreamInterrupted)
    assert chunks.text == "The capital of France"


def test_stream_reset_before_any_chunk_is_a_connection_error(server: FakeHTTPServer) -> None:
    server.queue(Reply(events=[chunk("Hi", "eos_token"), "[DONE]"], cut_after=0, reset=True, chunked=True))

    exc = fail(tgi(server.url), make_call())

    assert isinstance(exc, errors.ProviderConnectionError)


def test_empty_stream_is_a_connection_error(server: FakeHTTPServer) -> None:
    server.queue(Reply(events=["[DONE]"], chunked=True))

    exc = fail(tgi(server.url), make_call())

    assert isinstance(exc, errors.ProviderConnectionError)


def test_error_event_after_chunks_is_interrupted(server: FakeHTTPServer) -> None:
    error = tgi_error("Request failed during generation: Server error: CUDA out of memory", "generation")
    server.queue(Reply(events=[chunk("The capital"), chunk(" of"), error], chunked=True))
    chunks = ChunkCollector()

    exc = fail(tgi(server.url), make_call(), chunks)

    assert isinstance(exc, errors.StreamInterrupted)
    assert isinstance(exc.__cause__, errors.ServerError)
    assert "CUDA out of memory" in str(exc)
    assert len(chunks.chunks) == 2


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (tgi_error(CONTEXT_ERROR, "validation"), errors.ContextLengthExceeded),
        (tgi_error("Input validation error: `top_p` must be > 0.0 and < 1.0", "validation"), errors.BadProviderRequest),
        (tgi_error("Model is overloaded", "overloaded"), errors.Overloaded),
        (tgi_error("Incomplete generation", "incomplete_generation"), errors.ServerError),
    ],
)
def test_error_event_before_any_chunk_is_translated(
    server: FakeHTTPServer, event: dict[str, str], expected: type[errors.ProviderError]
) -> None:
    server.queue(Reply(events=[event], chunked=True))

    exc = fail(tgi(server.url), make_call())

    assert type(exc) is expected


def test_malformed_event_is_a_server_error(server: FakeHTTPServer) -> None:
    server.queue(Reply(events=["{not json"], chunked=True))

    exc = fail(tgi(server.url), make_call())

    assert isinstance(exc, errors.ServerError)


# --- limits --------------------------------------------------------------------------------


def test_slow_first_chunk_times_out_through_the_guard(server: FakeHTTPServer) -> None:
    """Headers come at once, the first token never does in time: the guard shuts the socket."""
    server.queue(streamed("late", first_event_delay_s=2.0))

    exc = fail(tgi(server.url, first_chunk_timeout_s=0.1), make_call())

    assert isinstance(exc, errors.ProviderTimeout)
    assert "first_chunk_timeout_s" in str(exc)


@pytest.mark.timeout(20)
def test_guard_shuts_a_stalled_stream_down(server: FakeHTTPServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the client's own timeout out of the way (an hour), only the guard's shutdown of
    the socket can end the blocked read; if it did not, pytest-timeout would fail the test."""
    shut: list[httpx2.Response] = []

    def spy(response: httpx2.Response) -> None:
        shut.append(response)
        real_shut_down(response)

    real_shut_down = hf_api._shut_down
    monkeypatch.setattr(hf_api, "_shut_down", spy)
    monkeypatch.setattr(hf_api, "_CLIENT_TIMEOUT_GRACE_S", 3600.0)
    server.queue(streamed("The capital", " of France", event_delay_s=60.0))
    chunks = ChunkCollector()

    exc = fail(tgi(server.url, timeout_s=0.2), make_call(), chunks)

    assert isinstance(exc, errors.StreamInterrupted)
    assert isinstance(exc.__cause__, errors.ProviderTimeout)
    assert chunks.text == "The capital"
    assert len(shut) == 1


def test_slow_headers_time_out_through_the_client_timeout(server: FakeHTTPServer) -> None:
    """Before the headers there is no socket to shut: the client's timeout ends the wait."""
    server.queue(streamed("late", delay_s=2.0))

    exc = fail(tgi(server.url, first_chunk_timeout_s=0.1), make_call())

    assert isinstance(exc, errors.ProviderTimeout)
    assert "first_chunk_timeout_s" in str(exc)


def test_first_chunk_limit_does_not_cap_a_non_streamed_answer(server: FakeHTTPServer) -> None:
    server.queue(Reply(json_body=completion("Paris."), delay_s=0.2))

    [reply] = tgi(server.url, first_chunk_timeout_s=0.05).run(make_call(stream=False), ChunkCollector())

    assert reply.content == "Paris."


def test_stall_after_chunks_past_timeout_s_is_interrupted(server: FakeHTTPServer) -> None:
    server.queue(streamed("The capital", " of France", " is Paris.", event_delay_s=2.0))
    chunks = ChunkCollector()

    exc = fail(tgi(server.url, timeout_s=0.2), make_call(), chunks)

    assert isinstance(exc, errors.StreamInterrupted)
    assert isinstance(exc.__cause__, errors.ProviderTimeout)
    assert chunks.text == "The capital"


def test_request_deadline_mid_stream(server: FakeHTTPServer) -> None:
    server.queue(streamed("The capital", " of France", " is Paris.", event_delay_s=2.0))
    chunks = ChunkCollector()

    exc = fail(tgi(server.url), make_call(deadline_s=0.2), chunks)

    assert isinstance(exc, errors.DeadlineExceeded)
    assert chunks.text == "The capital"


@pytest.mark.parametrize("stream", [True, False])
def test_request_deadline_before_the_answer(server: FakeHTTPServer, stream: bool) -> None:
    server.queue(Reply(json_body=completion("late"), delay_s=2.0) if not stream else streamed("late", delay_s=2.0))

    exc = fail(tgi(server.url), make_call(stream=stream, deadline_s=0.2))

    assert isinstance(exc, errors.DeadlineExceeded)


def test_on_chunk_exceptions_propagate_unchanged(server: FakeHTTPServer) -> None:
    server.queue(streamed("The capital", " of France", " is Paris."))
    stop = errors.Cancelled("cancelled by the producer")

    def cancel(chunk: StreamingChunk) -> None:
        raise stop

    with pytest.raises(errors.Cancelled) as caught:
        tgi(server.url).run(make_call(), cancel)

    assert caught.value is stop
    assert len(server.received) == 1


# --- serverless (Inference Providers) ------------------------------------------------------


class _ToFakeServer(httpx2.HTTPTransport):
    """Sends every request to the fake server; the ``Host`` header keeps the real host."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self._port = port

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        request.url = request.url.copy_with(scheme="http", host="127.0.0.1", port=self._port)
        return super().handle_request(request)


@pytest.fixture
def hub(server: FakeHTTPServer) -> Iterator[FakeHTTPServer]:
    """The fake server standing in for huggingface.co and router.huggingface.co."""
    port = int(server.url.rsplit(":", 1)[1])
    set_client_factory(
        lambda: httpx2.Client(
            transport=_ToFakeServer(port),
            event_hooks={"request": [hf_request_event_hook]},
            follow_redirects=True,
            timeout=None,
        )
    )
    _fetch_inference_provider_mapping.cache_clear()
    yield server
    set_client_factory(default_client_factory)
    _fetch_inference_provider_mapping.cache_clear()


@pytest.mark.parametrize("env_name", ["HF_TOKEN", "HF_API_TOKEN"])
def test_an_endpoint_on_a_hugging_face_host_gets_the_default_token(
    hub: FakeHTTPServer, monkeypatch: pytest.MonkeyPatch, env_name: str
) -> None:
    monkeypatch.setenv(env_name, TOKEN)
    hub.queue(Reply(json_body=completion("ok")))
    url = "https://xyz123.us-east-1.aws.endpoints.huggingface.cloud"

    endpoint = HfApiProvider("ep", HfApiConfig(api_type="inference_endpoints", url=url))
    endpoint.run(make_call(stream=False), ChunkCollector())

    [request] = hub.received
    assert host(request.headers) == "xyz123.us-east-1.aws.endpoints.huggingface.cloud"
    assert {k.lower(): v for k, v in request.headers.items()}["authorization"] == f"Bearer {TOKEN}"


def test_hugging_face_hosts() -> None:
    assert hf_api.is_hf_host("https://x.endpoints.huggingface.cloud/v1")
    assert hf_api.is_hf_host("https://router.huggingface.co") and hf_api.is_hf_host("https://huggingface.co")
    assert not hf_api.is_hf_host("http://127.0.0.1:8080")
    assert not hf_api.is_hf_host("https://huggingface.co.evil.example")
    assert not hf_api.is_hf_host("https://evilhuggingface.co")
    assert not hf_api.is_hf_host(None)


def serverless(provider: str | None = None) -> HfApiProvider:
    """A ``serverless_inference_api`` provider for ``MODEL``."""
    return HfApiProvider("hf", HfApiConfig(api_type="serverless_inference_api", model=MODEL, provider=provider))


def host(request_headers: dict[str, str]) -> str:
    """The Host a request was addressed to."""
    return {name.lower(): value for name, value in request_headers.items()}["host"]


def test_serverless_auto_routing_calls_the_router_directly(
    hub: FakeHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_API_TOKEN", TOKEN)
    hub.queue(streamed("Paris."))

    [reply] = serverless().run(make_call(max_tokens=8), ChunkCollector())

    assert reply.content == "Paris."
    [request] = hub.received  # no Hub lookup: the router picks the provider
    assert (host(request.headers), request.path) == ("router.huggingface.co", "/v1/chat/completions")
    assert request.body["model"] == MODEL
    assert request.body["max_tokens"] == 8
    assert {k.lower(): v for k, v in request.headers.items()}["authorization"] == f"Bearer {TOKEN}"


def test_serverless_named_provider_looks_up_the_mapping_then_routes(
    hub: FakeHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_API_TOKEN", TOKEN)
    mapping = {"together": {"status": "live", "providerId": "meta-llama/Llama-3.1-8B-Turbo", "task": "conversational"}}
    hub.queue(Reply(json_body={"id": MODEL, "_id": "abc", "inferenceProviderMapping": mapping}))
    hub.queue(Reply(json_body=completion("Paris.")))

    [reply] = serverless("together").run(make_call(stream=False), ChunkCollector())

    assert reply.content == "Paris."
    lookup, chat = hub.received
    assert (host(lookup.headers), lookup.method, lookup.path) == ("huggingface.co", "GET", f"/api/models/{MODEL}")
    assert (host(chat.headers), chat.path) == ("router.huggingface.co", "/together/v1/chat/completions")
    assert chat.body["model"] == "meta-llama/Llama-3.1-8B-Turbo"


def test_serverless_model_not_served_by_the_provider(hub: FakeHTTPServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_API_TOKEN", TOKEN)
    mapping = {"groq": {"status": "live", "providerId": "llama-3.1-8b", "task": "conversational"}}
    hub.queue(Reply(json_body={"id": MODEL, "_id": "abc", "inferenceProviderMapping": mapping}))

    exc = fail(serverless("together"), make_call())

    assert isinstance(exc, errors.UnknownModel)
    assert len(hub.received) == 1


def test_serverless_needs_a_token(hub: FakeHTTPServer) -> None:
    exc = fail(serverless(), make_call())

    assert isinstance(exc, errors.AuthenticationFailed)
    assert "HF_API_TOKEN" in str(exc)
    assert hub.received == []


# --- the translation boundary itself -------------------------------------------------------


def _response(status: int, body: Any = None, headers: dict[str, str] | None = None) -> httpx2.Response:
    request = httpx2.Request("POST", "http://127.0.0.1:1/v1/chat/completions")
    return httpx2.Response(status, json=body or {}, headers=headers, request=request)


def test_retry_after_as_an_http_date() -> None:
    from huggingface_hub.errors import HfHubHTTPError

    when = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    exc = HfHubHTTPError("429", response=_response(429, {"error": "slow down"}, {"Retry-After": when}))

    error = translate_hf_error(exc, "tgi")

    assert isinstance(error, errors.RateLimited)
    assert error.retry_after_s is not None and 100 < error.retry_after_s <= 120


def test_translation_redacts_secrets_and_tokens() -> None:
    from huggingface_hub.errors import HfHubHTTPError

    body = {"error": f"key {TOKEN} rejected; sent Bearer sk-other-secret and custom-secret"}
    exc = HfHubHTTPError("401", response=_response(401, body))

    error = translate_hf_error(exc, "tgi", secrets=["custom-secret"])

    assert isinstance(error, errors.AuthenticationFailed)
    for secret in (TOKEN, "sk-other-secret", "custom-secret"):
        assert secret not in error.message


def test_unexpected_exception_is_a_plain_provider_error() -> None:
    error = translate_hf_error(RuntimeError("boom"), "tgi")

    assert type(error) is errors.ProviderError


def test_taxonomy_errors_pass_through() -> None:
    original = errors.Overloaded("busy")

    assert translate_hf_error(original, "tgi") is original
