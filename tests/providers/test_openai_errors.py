"""``translate_openai_error``: the openai SDK's exceptions (built as the SDK builds them, around
real ``httpx2`` responses) and transport errors, mapped onto Cascade's taxonomy, with messages
that keep the vendor's code and words but never a credential."""

from __future__ import annotations

import email.utils
import ssl
import time
from typing import Any

import httpx2
import openai
import pytest

from providers import errors
from providers.openai.errors import OpenAIPayloadError, translate_openai_error
from tests.providers.openai_wire import API_KEY, assert_no_secret

URL = "https://api.openai.com/v1/chat/completions"
STATUS_ERRORS: dict[int, type[openai.APIStatusError]] = {
    400: openai.BadRequestError,
    401: openai.AuthenticationError,
    403: openai.PermissionDeniedError,
    404: openai.NotFoundError,
    409: openai.ConflictError,
    422: openai.UnprocessableEntityError,
    429: openai.RateLimitError,
}


def request() -> httpx2.Request:
    return httpx2.Request("POST", URL, headers={"Authorization": f"Bearer {API_KEY}"})


def status_error(
    status: int,
    message: str = "something went wrong",
    code: str | None = None,
    type_: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> openai.APIStatusError:
    """The exception the SDK raises for a ``status`` answer with OpenAI's error body."""
    body = {"message": message, "type": type_, "param": None, "code": code, **extra}
    response = httpx2.Response(status, headers=headers or {}, json={"error": body}, request=request())
    error_class = STATUS_ERRORS.get(status, openai.InternalServerError if status >= 500 else openai.APIStatusError)
    return error_class(f"Error code: {status} - {message}", response=response, body=body)


def stream_error(message: str, code: str | None = None, type_: str | None = None) -> openai.APIError:
    """The exception the SDK raises for ``data: {"error": {...}}`` inside a 200 stream."""
    return openai.APIError(message, request(), body={"message": message, "code": code, "type": type_})


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (400, errors.BadProviderRequest),
        (401, errors.AuthenticationFailed),
        (403, errors.AuthenticationFailed),
        (404, errors.UnknownModel),
        (408, errors.ProviderTimeout),
        (409, errors.ServerError),
        (413, errors.ContextLengthExceeded),
        (422, errors.BadProviderRequest),
        (429, errors.RateLimited),
        (500, errors.ServerError),
        (502, errors.ServerError),
        (503, errors.Overloaded),
        (504, errors.ServerError),
        (529, errors.Overloaded),
    ],
)
def test_status_codes(status: int, expected: type[errors.ProviderError]) -> None:
    error = translate_openai_error(status_error(status), "primary")

    assert type(error) is expected
    assert error.message.startswith(f"primary: HTTP {status}")
    assert "something went wrong" in error.message


def test_server_error_keeps_status_code() -> None:
    error = translate_openai_error(status_error(502), "primary")

    assert isinstance(error, errors.ServerError)
    assert error.status_code == 502


@pytest.mark.parametrize(
    ("status", "code", "type_", "message", "expected"),
    [
        (400, "context_length_exceeded", "invalid_request_error", "too long", errors.ContextLengthExceeded),
        (400, None, None, "This model's maximum context length is 8192 tokens", errors.ContextLengthExceeded),
        (400, "content_filter", None, "The response was filtered", errors.ContentFiltered),
        (400, "content_policy_violation", None, "Your request was rejected", errors.ContentFiltered),
        (400, "invalid_value", "invalid_request_error", "Invalid 'top_p'", errors.BadProviderRequest),
        (429, "insufficient_quota", "insufficient_quota", "You exceeded your current quota", errors.RateLimited),
        (500, "overloaded", None, "try again later", errors.Overloaded),
        (404, "DeploymentNotFound", None, "The API deployment does not exist", errors.UnknownModel),
    ],
)
def test_vendor_codes(
    status: int, code: str | None, type_: str | None, message: str, expected: type[errors.ProviderError]
) -> None:
    error = translate_openai_error(status_error(status, message, code, type_), "primary")

    assert type(error) is expected
    assert message in error.message
    if code:
        assert code in error.message


def test_azure_content_filter_body() -> None:
    exc = status_error(
        400,
        "The response was filtered due to the prompt triggering Azure OpenAI's content management policy.",
        code="content_filter",
        innererror={"code": "ResponsibleAIPolicyViolation", "content_filter_result": {"hate": {"filtered": True}}},
    )

    assert isinstance(translate_openai_error(exc, "azure"), errors.ContentFiltered)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "12"}, 12.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "250", "retry-after": "3"}, 0.25),
        ({"retry-after": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after(headers: dict[str, str], expected: float | None) -> None:
    error = translate_openai_error(status_error(429, headers=headers), "primary")

    assert isinstance(error, errors.RateLimited)
    assert error.retry_after_s == expected


def test_retry_after_as_http_date() -> None:
    later = email.utils.formatdate(time.time() + 30, usegmt=True)

    error = translate_openai_error(status_error(429, headers={"retry-after": later}), "primary")

    assert isinstance(error, errors.RateLimited)
    assert error.retry_after_s is not None and 0 < error.retry_after_s <= 31


@pytest.mark.parametrize(
    ("code", "type_", "expected"),
    [
        ("rate_limit_exceeded", None, errors.RateLimited),
        (None, "server_error", errors.ServerError),
        ("context_length_exceeded", "invalid_request_error", errors.ContextLengthExceeded),
        ("content_filter", None, errors.ContentFiltered),
        ("overloaded", None, errors.Overloaded),
        (None, None, errors.ServerError),
    ],
)
def test_errors_inside_a_200_stream(code: str | None, type_: str | None, expected: type[errors.ProviderError]) -> None:
    error = translate_openai_error(stream_error("it broke", code, type_), "primary")

    assert type(error) is expected
    assert "error inside the answer" in error.message and "it broke" in error.message


def test_payload_errors() -> None:
    error = translate_openai_error(OpenAIPayloadError("Rate limit reached", code="rate_limit_exceeded"), "p")
    assert isinstance(error, errors.RateLimited)
    assert error.retry_after_s is None

    error = translate_openai_error(OpenAIPayloadError("failed", code="server_error"), "p")
    assert isinstance(error, errors.ServerError) and error.status_code is None


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (openai.APITimeoutError(request=request()), errors.ProviderTimeout),
        (openai.APIConnectionError(request=request()), errors.ProviderConnectionError),
        (httpx2.ReadTimeout("timed out"), errors.ProviderTimeout),
        (httpx2.ConnectError("[Errno 111] Connection refused"), errors.ProviderConnectionError),
        (httpx2.RemoteProtocolError("peer closed connection"), errors.ProviderConnectionError),
        (ssl.SSLError("certificate verify failed"), errors.ProviderConnectionError),
        (ConnectionResetError(104, "Connection reset by peer"), errors.ProviderConnectionError),
        (openai.ContentFilterFinishReasonError(), errors.ContentFiltered),
        (ValueError("Expecting value: line 1 column 1"), errors.ServerError),
    ],
    ids=lambda value: type(value).__name__,
)
def test_transport_and_other_errors(exc: BaseException, expected: type[errors.ProviderError]) -> None:
    assert type(translate_openai_error(exc, "primary")) is expected


def test_connection_error_names_its_root_cause() -> None:
    exc = openai.APIConnectionError(request=request())
    exc.__cause__ = httpx2.ConnectError("[Errno 111] Connection refused")

    error = translate_openai_error(exc, "primary")

    assert "ConnectError" in error.message


def test_taxonomy_errors_pass_through() -> None:
    original = errors.ProviderTimeout("primary: no first chunk")

    assert translate_openai_error(original, "primary") is original


@pytest.mark.parametrize(
    "message",
    [
        f"Incorrect API key provided: {API_KEY}. You can find your API key at https://platform.openai.com.",
        "Incorrect API key provided: sk-proj-abc***************************wxyz.",
        f"Header was Authorization: Bearer {API_KEY}",
        f"could not reach https://user:{API_KEY}@proxy.example.com/v1",
        f"GET /openai/deployments/x?api-key={API_KEY}&x=1 failed",
    ],
    ids=["key", "masked-key", "bearer", "url-credentials", "query-key"],
)
def test_messages_never_hold_credentials(message: str) -> None:
    error = translate_openai_error(status_error(401, message, "invalid_api_key"), "primary")

    assert_no_secret(error, API_KEY, "sk-proj-abc")
    assert "[redacted]" in error.message
    assert "401" in error.message and "invalid_api_key" in error.message


def test_known_secrets_are_scrubbed_whatever_their_shape() -> None:
    token = "opaque-Azure-AD-token-value"

    error = translate_openai_error(stream_error(f"token {token} expired"), "azure", secrets=[token])

    assert token not in error.message


def test_jwt_tokens_are_scrubbed() -> None:
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJjYXNjYWRlIn0.c2lnbmF0dXJl"

    error = translate_openai_error(status_error(401, f"token {jwt} is expired"), "azure")

    assert jwt not in error.message


def test_long_vendor_messages_are_truncated() -> None:
    error = translate_openai_error(status_error(400, "x" * 5000), "primary")

    assert len(error.message) < 400
    assert error.message.endswith("...")
