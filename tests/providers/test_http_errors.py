"""``providers.http_errors``: the one table from an HTTP error answer to the taxonomy, the
Retry-After parser and the secret scrubber that every provider's error module shares."""

from __future__ import annotations

import email.utils
from datetime import UTC, datetime

import pytest

from providers import errors
from providers.http_errors import MAX_VENDOR_MESSAGE, REDACTED, classify, retry_after_s, scrub

# --- the status rows -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (302, errors.ServerError),
        (400, errors.BadProviderRequest),
        (401, errors.AuthenticationFailed),
        (403, errors.AuthenticationFailed),
        (404, errors.UnknownModel),
        (405, errors.BadProviderRequest),
        (408, errors.ProviderTimeout),
        (409, errors.ServerError),
        (413, errors.ContextLengthExceeded),
        (422, errors.BadProviderRequest),
        (424, errors.ServerError),
        (429, errors.RateLimited),
        (500, errors.ServerError),
        (502, errors.ServerError),
        (503, errors.Overloaded),
        (504, errors.ServerError),
        (529, errors.Overloaded),
        (None, errors.ServerError),
    ],
)
def test_each_status_row(status: int | None, expected: type[errors.ProviderError]) -> None:
    error = classify("p: failed", status=status, vendor_message="something went wrong")

    assert type(error) is expected
    assert error.message == "p: failed"


@pytest.mark.parametrize("status", [302, 409, 424, 500, 503, None])
def test_server_errors_keep_their_status(status: int | None) -> None:
    error = classify("p: failed", status=status, plain_503_is_overloaded=False)

    assert isinstance(error, errors.ServerError)
    assert error.status_code == status


@pytest.mark.parametrize(
    ("codes", "message", "expected"),
    [
        ((), "Service Unavailable", errors.ServerError),
        ((), "Model org/model is currently loading", errors.Overloaded),
        ((), "the server is too busy", errors.Overloaded),
        (("overloaded",), "", errors.Overloaded),
    ],
)
def test_a_bare_503_is_overloaded_only_when_the_vendor_says_so(
    codes: tuple[str, ...], message: str, expected: type[errors.ProviderError]
) -> None:
    error = classify("p", status=503, codes=codes, vendor_message=message, plain_503_is_overloaded=False)

    assert type(error) is expected


# --- vendor codes and messages -------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("context_length_exceeded", errors.ContextLengthExceeded),
        ("content_filter", errors.ContentFiltered),
        ("ResponsibleAIPolicyViolation", errors.ContentFiltered),
        ("overloaded_error", errors.Overloaded),
        ("rate_limit_exceeded", errors.RateLimited),
        ("invalid_api_key", errors.AuthenticationFailed),
        ("DeploymentNotFound", errors.UnknownModel),
        ("request_timeout", errors.ProviderTimeout),
        ("validation", errors.BadProviderRequest),
        ("generation", errors.ServerError),
    ],
)
def test_each_code_family_inside_a_200_answer(code: str, expected: type[errors.ProviderError]) -> None:
    error = classify("p", status=None, codes=(None, code))

    assert type(error) is expected


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (400, "context_length_exceeded", errors.ContextLengthExceeded),
        (429, "context_length_exceeded", errors.ContextLengthExceeded),
        (500, "context_length_exceeded", errors.ServerError),
        (400, "content_policy_violation", errors.ContentFiltered),
        (500, "content_policy_violation", errors.ServerError),
        (500, "overloaded", errors.Overloaded),
        (429, "overloaded", errors.RateLimited),
        (400, "rate_limit_exceeded", errors.BadProviderRequest),
        (429, "insufficient_quota", errors.RateLimited),
        (422, "validation", errors.BadProviderRequest),
    ],
)
def test_codes_count_only_in_their_status_range(status: int, code: str, expected: type[errors.ProviderError]) -> None:
    assert type(classify("p", status=status, codes=(code,))) is expected


@pytest.mark.parametrize(
    "message",
    [
        "This model's maximum context length is 8192 tokens",
        "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. Given: 4000",
        "Input validation error: `inputs` must have less than 4096 tokens. Given: 5000",
        "prompt is too long: 210000 tokens > 200000 maximum",
        "Too many input tokens",
    ],
)
def test_context_length_messages(message: str) -> None:
    assert isinstance(classify("p", status=400, vendor_message=message), errors.ContextLengthExceeded)
    assert isinstance(classify("p", status=None, vendor_message=message), errors.ContextLengthExceeded)
    assert isinstance(classify("p", status=500, vendor_message=message), errors.ServerError)


def test_codes_are_matched_whatever_their_case() -> None:
    assert isinstance(classify("p", status=None, codes=("Rate_Limit_Exceeded",)), errors.RateLimited)


def test_a_429_carries_its_retry_after() -> None:
    error = classify("p", status=429, headers={"Retry-After": "7"})

    assert isinstance(error, errors.RateLimited)
    assert error.retry_after_s == 7.0


# --- Retry-After ---------------------------------------------------------------------------

NOW = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC).timestamp()


def http_date(seconds_from_now: float) -> str:
    return email.utils.formatdate(NOW + seconds_from_now, usegmt=True)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "12"}, 12.0),
        ({"Retry-After": "0.5"}, 0.5),
        ({"retry-after": " 3 "}, 3.0),
        ({"retry-after": "-4"}, 0.0),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "250", "retry-after": "3"}, 0.25),
        ({"retry-after-ms": "soon", "retry-after": "3"}, 3.0),
        ({"retry-after": http_date(30)}, 30.0),
        ({"retry-after": http_date(-600)}, 0.0),
        ({"retry-after": "Wed, 01 Jan 2030 12:00:45 -0000"}, 45.0),
        ({"retry-after": "soon"}, None),
        ({"retry-after": "Fri, 99 Foo 2030 99:99:99 GMT"}, None),
        ({"retry-after": "inf"}, None),
        ({"retry-after": "nan"}, None),
        ({"retry-after": ""}, None),
        ({}, None),
        (None, None),
    ],
)
def test_retry_after(headers: dict[str, str] | None, expected: float | None) -> None:
    assert retry_after_s(headers, now=NOW) == expected


# --- scrubbing -----------------------------------------------------------------------------

KEY = "sk-proj-DoNotLeak0123456789abcdef"
HF_TOKEN = "hf_DoNotLeak0123456789abcdef"
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJjYXNjYWRlIn0.c2lnbmF0dXJl"


@pytest.mark.parametrize(
    ("text", "secret", "expected"),
    [
        (f"Incorrect API key provided: {KEY}.", KEY, f"Incorrect API key provided: {REDACTED}"),
        ("key sk-proj-abc*****************wxyz was masked", "sk-proj-abc", f"key {REDACTED} was masked"),
        ("rk-live-0123456789 and pk-0123456789", "0123456789", f"{REDACTED} and {REDACTED}"),
        (f"Authorization: Bearer {HF_TOKEN}", HF_TOKEN, f"Authorization: Bearer {REDACTED}"),
        ("Authorization: basic dXNlcjpwYXNz", "dXNlcjpwYXNz", f"Authorization: basic {REDACTED}"),
        (f"token {HF_TOKEN} rejected", HF_TOKEN, f"token {REDACTED} rejected"),
        (f"HF_{HF_TOKEN[3:]} rejected", HF_TOKEN[3:], f"{REDACTED} rejected"),
        (f"token {JWT} is expired", JWT, f"token {REDACTED} is expired"),
        ("GET /x?api-key=abc123&x=1 failed", "abc123", f"GET /x?api-key={REDACTED}&x=1 failed"),
        ("password: hunter2, retry", "hunter2", f"password: {REDACTED}, retry"),
        ("no route to https://user:pw@proxy.example.com/v1", "user:pw", f"no route to https://{REDACTED}@proxy"),
    ],
    ids=["key", "masked-key", "rk-pk", "bearer", "basic", "hf-token", "hf-upper", "jwt", "query", "label", "url"],
)
def test_each_secret_form_is_scrubbed(text: str, secret: str, expected: str) -> None:
    scrubbed = scrub(text)

    assert secret not in scrubbed
    assert scrubbed.startswith(expected)


def test_configured_secrets_are_scrubbed_whatever_their_shape() -> None:
    scrubbed = scrub(
        "token opaque-Azure-AD-value expired; sent custom-secret", ["opaque-Azure-AD-value", "", "custom-secret"]
    )

    assert scrubbed == f"token {REDACTED} expired; sent {REDACTED}"


def test_env_var_names_are_not_secrets() -> None:
    assert scrub("set HF_API_TOKEN or HF_TOKEN") == "set HF_API_TOKEN or HF_TOKEN"


def test_messages_are_one_line_and_bounded() -> None:
    assert scrub("line one\n\n  line   two\t") == "line one line two"
    long = scrub("x" * 5000)
    assert len(long) == MAX_VENDOR_MESSAGE
    assert long.endswith("...")
    assert scrub("x" * MAX_VENDOR_MESSAGE) == "x" * MAX_VENDOR_MESSAGE
