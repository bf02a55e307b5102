"""The one boundary where the ``openai`` SDK's exceptions become Cascade's taxonomy.

``translate_openai_error`` classifies an SDK exception (or an ``httpx2`` transport error that
surfaced through the SDK, or an error the API reported inside a 200 answer) by its HTTP
status, the vendor's error ``code`` / ``type`` and, for context-window errors, its message.
The message it builds holds the status, the vendor's code and the vendor's own message,
truncated and scrubbed: never a key, an ``Authorization`` value or a URL with credentials.
"""

from __future__ import annotations

import email.utils
import math
import re
import ssl
import time
from collections.abc import Iterable, Mapping
from typing import Any

import httpx2
import openai

from providers import errors

_MAX_VENDOR_MESSAGE = 300
_REDACTED = "[redacted]"

# Vendor codes and types, lower-cased. OpenAI, Azure and OpenAI-compatible servers disagree
# on spelling, so each class lists the words seen in the wild.
_CONTEXT_CODES = frozenset({"context_length_exceeded", "string_above_max_length_tokens", "request_too_large"})
_FILTER_CODES = frozenset(
    {
        "content_filter",
        "content_policy_violation",
        "responsibleaipolicyviolation",
        "image_content_policy_violation",
        "bio_policy",
        "misalignment_policy_violation",
    }
)
_OVERLOADED_CODES = frozenset({"overloaded", "overloaded_error", "server_overloaded", "engine_overloaded"})
_RATE_CODES = frozenset({"rate_limit_exceeded", "rate_limit_error", "rate_limited", "too_many_requests"})
_AUTH_CODES = frozenset({"invalid_api_key", "authentication_error", "permission_error", "unauthorized"})
_NOT_FOUND_CODES = frozenset({"model_not_found", "deploymentnotfound", "not_found_error", "not_found"})
_TIMEOUT_CODES = frozenset({"timeout", "request_timeout", "vector_store_timeout"})
_CONTEXT_MESSAGE = re.compile(
    r"context[ _]length|maximum context|context window|too many tokens|prompt is too long|input is too long",
    re.IGNORECASE,
)

# What a secret looks like in a vendor's message (OpenAI echoes masked keys on 401s).
_SECRET_PATTERNS = (
    re.compile(r"(?i)\b(?:bearer|basic)\s+[^\s,;\"']+"),
    re.compile(r"\b(?:sk|rk|pk|sess)-[A-Za-z0-9_*.\-]{4,}"),
    re.compile(r"\beyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.?[A-Za-z0-9_\-]*"),  # JWTs (Azure AD tokens)
    re.compile(r"(?i)\b(api[-_]?key|access[-_]?token|token|key|sig|secret|password)(\s*[=:]\s*)[^&\s,;\"']+"),
    re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/\s@]+@"),
)


class OpenAIPayloadError(openai.OpenAIError):
    """An error the API reported inside a 200 answer (a Responses ``error`` event, a failed or
    content-filtered response), raised by the providers so that it crosses the same boundary."""

    def __init__(self, message: str, *, code: str | None = None, type: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.type = type


def translate_openai_error(
    exc: BaseException, provider_id: str, *, secrets: Iterable[str] = ()
) -> errors.ProviderError:
    """The taxonomy error for ``exc``; ``secrets`` are extra values to scrub from the message.

    Taxonomy errors pass through unchanged. Anything unrecognised (a garbled event the SDK
    could not decode) is a ``ServerError``: the provider sent something it should not have.
    """
    if isinstance(exc, errors.ProviderError):
        return exc
    if isinstance(exc, openai.APITimeoutError | httpx2.TimeoutException | TimeoutError):
        return errors.ProviderTimeout(f"{provider_id}: request timed out")
    if isinstance(exc, openai.APIConnectionError) or _is_transport_error(exc):
        return errors.ProviderConnectionError(f"{provider_id}: connection failed ({_root_cause_name(exc)})")
    if isinstance(exc, openai.ContentFilterFinishReasonError):
        return errors.ContentFiltered(f"{provider_id}: the completion was stopped by the content filter")
    if isinstance(exc, openai.APIStatusError | openai.APIError | OpenAIPayloadError):
        status = exc.status_code if isinstance(exc, openai.APIStatusError) else None
        headers = exc.response.headers if isinstance(exc, openai.APIStatusError) else None
        code, kind = _str_or_none(getattr(exc, "code", None)), _str_or_none(getattr(exc, "type", None))
        message = _vendor_message(exc)
        text = _describe(provider_id, status, code or kind, _scrub(message, secrets))
        return _classify(status, code, kind, message, text, headers)
    return errors.ServerError(f"{provider_id}: unreadable answer from the provider ({type(exc).__name__})")


def _classify(
    status: int | None,
    code: str | None,
    kind: str | None,
    message: str,
    text: str,
    headers: Mapping[str, str] | None,
) -> errors.ProviderError:
    words = {word.lower() for word in (code, kind) if word}
    client_side = status is None or 400 <= status < 500
    if client_side and (words & _CONTEXT_CODES or status == 413 or _CONTEXT_MESSAGE.search(message)):
        return errors.ContextLengthExceeded(text)
    if client_side and words & _FILTER_CODES:
        return errors.ContentFiltered(text)
    if status in (503, 529) or ((status is None or status >= 500) and (words & _OVERLOADED_CODES)):
        return errors.Overloaded(text)
    if status == 429 or (status is None and words & _RATE_CODES):
        return errors.RateLimited(text, retry_after_s=_retry_after(headers))
    if status in (401, 403) or (status is None and words & _AUTH_CODES):
        return errors.AuthenticationFailed(text)
    if status == 404 or (status is None and words & _NOT_FOUND_CODES):
        return errors.UnknownModel(text)
    if status == 408 or (status is None and words & _TIMEOUT_CODES):
        return errors.ProviderTimeout(text)
    if status is None or status >= 500 or status < 400 or status == 409:
        # No status: an error inside a 200 stream, most often a hiccup on the vendor's side.
        # 409 is a lock conflict the vendor asks clients to retry.
        return errors.ServerError(text, status_code=status)
    return errors.BadProviderRequest(text)


def _describe(provider_id: str, status: int | None, code: str | None, message: str) -> str:
    where = f"HTTP {status}" if status is not None else "error inside the answer"
    label = f" {code}" if code else ""
    return f"{provider_id}: {where}{label}: {message}" if message else f"{provider_id}: {where}{label}"


def _vendor_message(exc: BaseException) -> str:
    """The vendor's own message (not the SDK's "Error code: ..." wrapper), if it sent one."""
    body = getattr(exc, "body", None)
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping) and isinstance(inner.get("message"), str):
            return str(inner["message"])
    if isinstance(exc, OpenAIPayloadError):
        return exc.message
    if isinstance(exc, openai.APIStatusError) or not isinstance(exc, openai.APIError):
        return ""
    return exc.message


def _scrub(message: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            message = message.replace(secret, _REDACTED)
    for pattern in _SECRET_PATTERNS:
        message = pattern.sub(_redaction, message)
    message = " ".join(message.split())
    if len(message) > _MAX_VENDOR_MESSAGE:
        message = message[: _MAX_VENDOR_MESSAGE - 3] + "..."
    return message


def _redaction(match: re.Match[str]) -> str:
    # Keep the label of "key=..." and the scheme of "https://user:pw@" so the message still reads.
    if match.re.groups == 2:
        return f"{match.group(1)}{match.group(2)}{_REDACTED}"
    if match.re.groups == 1:
        return f"{match.group(1)}{_REDACTED}@"
    return _REDACTED


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds from ``retry-after-ms`` or ``retry-after`` (a number or an HTTP date)."""
    if headers is None:
        return None
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            seconds = _seconds_until(value) if name == "retry-after" else math.nan
        if math.isfinite(seconds):
            return max(0.0, seconds)
    return None


def _seconds_until(http_date: str) -> float:
    try:
        parsed = email.utils.parsedate_tz(http_date)
        return float(email.utils.mktime_tz(parsed) - time.time()) if parsed else math.nan
    except (TypeError, ValueError, OverflowError):
        return math.nan


def _is_transport_error(exc: BaseException) -> bool:
    return isinstance(exc, httpx2.TransportError | httpx2.StreamError | ssl.SSLError | ConnectionError | OSError)


def _root_cause_name(exc: BaseException) -> str:
    """The innermost exception's class name: says "ConnectError" rather than "Connection error."."""
    seen: set[int] = set()
    while exc.__cause__ is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__
    return type(exc).__name__


def _str_or_none(value: Any) -> str | None:
    return str(value) if value not in (None, "") else None
