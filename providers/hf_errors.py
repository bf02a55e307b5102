"""The one boundary between huggingface_hub's exceptions and Cascade's error taxonomy.

``InferenceClient.chat_completion`` raises ``HfHubHTTPError`` (with the ``httpx2`` response)
for an error status, a ``TextGenerationError`` subclass for an error event inside a 200 stream
(TGI's ``data: {"error": ..., "error_type": ...}``), ``InferenceTimeoutError`` when the request
times out before the response, raw ``httpx2`` transport errors while a stream is read, and
``ValueError`` when it cannot build the request (no provider mapping, no key) or decode a line.
"""

from __future__ import annotations

import email.utils
import json
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

import httpx2
from huggingface_hub.errors import (
    GenerationError,
    HfHubHTTPError,
    IncompleteGenerationError,
    InferenceTimeoutError,
    OfflineModeIsEnabled,
    OverloadedError,
    TextGenerationError,
)
from huggingface_hub.errors import ValidationError as TgiValidationError

from providers import errors

# TGI: "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. Given: ..."
# and "`inputs` must have less than 4096 tokens"; the rest is how other servers behind the
# router word it.
_CONTEXT_LENGTH = re.compile(
    r"tokens \+ `max_new_tokens` must be <=|must have less than \d+ tokens|context length|context window"
    r"|maximum context|too many (input )?tokens|(input|prompt) is too long",
    re.IGNORECASE,
)
# Serverless answers 503 "Model ... is currently loading" while it cold-starts a model.
_OVERLOADED = re.compile(r"overloaded|is (currently )?loading|too busy", re.IGNORECASE)
_UNKNOWN_MODEL = re.compile(r"not supported by provider|no provider mapping|not supported for task", re.IGNORECASE)
_NO_KEY = re.compile(r"api[_ ]?key|log in", re.IGNORECASE)
_TOKENISH = re.compile(r"(Bearer\s+)\S+|hf_[A-Za-z0-9]{8,}", re.IGNORECASE)
_DETAIL_MAX_CHARS = 300

_TGI_ERROR_TYPES: dict[type[TextGenerationError], str] = {
    TgiValidationError: "validation",
    OverloadedError: "overloaded",
    GenerationError: "generation",
    IncompleteGenerationError: "incomplete_generation",
}

TIMEOUT_ERRORS: tuple[type[BaseException], ...] = (InferenceTimeoutError, httpx2.TimeoutException, TimeoutError)
# What a failed chat_completion raises. TypeError, AttributeError and KeyError come from its
# lenient parsing of a malformed answer. Nothing broader is caught, so Celery's
# SoftTimeLimitExceeded and on_chunk's Cancelled/DeadlineExceeded pass through untouched.
HF_FAILURES: tuple[type[BaseException], ...] = (
    httpx2.HTTPError,
    httpx2.InvalidURL,
    httpx2.StreamError,
    OSError,
    ValueError,
    TypeError,
    AttributeError,
    KeyError,
)


def translate_hf_error(exc: BaseException, provider_id: str, *, secrets: Sequence[str] = ()) -> errors.ProviderError:
    """Cascade's error for ``exc``, raised by huggingface_hub or its ``httpx2`` transport.

    Messages hold the provider id, the status, TGI's ``error_type`` and the server's own error
    text with ``secrets`` and anything token-like redacted; never a URL or a request header.
    """
    if isinstance(exc, errors.ProviderError):
        return exc
    if isinstance(exc, HfHubHTTPError):
        return _from_response(exc.response, provider_id, secrets)
    if isinstance(exc, TextGenerationError):
        error_type = next((name for cls, name in _TGI_ERROR_TYPES.items() if isinstance(exc, cls)), None)
        detail = redact(str(exc), secrets)
        return _from_error_type(error_type, detail, f"{provider_id}: error in stream ({error_type}): {detail}")
    if isinstance(exc, OfflineModeIsEnabled):
        return errors.ProviderUnavailable(f"{provider_id}: huggingface_hub offline mode (HF_HUB_OFFLINE) blocks it")
    if isinstance(exc, TIMEOUT_ERRORS):
        return errors.ProviderTimeout(f"{provider_id}: no answer within the HTTP timeout")
    if isinstance(exc, httpx2.UnsupportedProtocol | httpx2.InvalidURL):
        return errors.BadProviderRequest(f"{provider_id}: the configured URL cannot be used ({type(exc).__name__})")
    if isinstance(exc, httpx2.TransportError | OSError):
        return errors.ProviderConnectionError(f"{provider_id}: connection failed ({type(exc).__name__})")
    if isinstance(exc, json.JSONDecodeError | TypeError | AttributeError | KeyError):
        return errors.ServerError(f"{provider_id}: malformed answer ({type(exc).__name__})")
    if isinstance(exc, ValueError):
        detail = redact(str(exc), secrets)
        message = f"{provider_id}: huggingface_hub refused the call: {detail}"
        if _UNKNOWN_MODEL.search(detail):
            return errors.UnknownModel(message)
        if _NO_KEY.search(detail):
            return errors.AuthenticationFailed(message)
        return errors.BadProviderRequest(message)
    return errors.ProviderError(f"{provider_id}: unexpected {type(exc).__name__} from huggingface_hub")


def redact(text: str, secrets: Sequence[str] = ()) -> str:
    """``text`` on one line, at most a few hundred characters, with secrets and tokens masked."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = _TOKENISH.sub(lambda match: f"{match.group(1) or ''}***", text)
    text = " ".join(text.split())
    return text if len(text) <= _DETAIL_MAX_CHARS else text[: _DETAIL_MAX_CHARS - 3] + "..."


def _from_response(response: httpx2.Response, provider_id: str, secrets: Sequence[str]) -> errors.ProviderError:
    status = response.status_code
    detail, error_type = _server_error(response)
    detail = redact(detail, secrets)
    message = (
        f"{provider_id}: HTTP {status}" + (f" ({error_type})" if error_type else "") + (f": {detail}" if detail else "")
    )
    if status in (401, 403):
        return errors.AuthenticationFailed(message)
    if status == 404:
        return errors.UnknownModel(message)
    if status == 408:
        return errors.ProviderTimeout(message)
    if status == 429:
        return errors.RateLimited(message, retry_after_s=retry_after_s(response.headers))
    if status == 413 or (status in (400, 422) and _CONTEXT_LENGTH.search(detail)):
        return errors.ContextLengthExceeded(message)
    if status == 529 or (status == 503 and (error_type == "overloaded" or _OVERLOADED.search(detail))):
        return errors.Overloaded(message)
    if status >= 500 or status == 424:  # TGI answers 424 when generation itself failed
        return errors.ServerError(message, status_code=status)
    return errors.BadProviderRequest(message)


def _from_error_type(error_type: str | None, detail: str, message: str) -> errors.ProviderError:
    if error_type == "validation":
        if _CONTEXT_LENGTH.search(detail):
            return errors.ContextLengthExceeded(message)
        return errors.BadProviderRequest(message)
    if error_type == "overloaded":
        return errors.Overloaded(message)
    return errors.ServerError(message)


def _server_error(response: httpx2.Response) -> tuple[str, str | None]:
    """The error text and type of an error body: TGI's ``{error, error_type}`` or OpenAI's
    ``{error: {message, type}}``."""
    try:
        body = response.json()
    except (ValueError, RuntimeError):  # not JSON, or a stream that was never read
        return "", None
    if not isinstance(body, dict):
        return "", None
    error = body.get("error")
    if isinstance(error, dict):
        text, kind = error.get("message"), error.get("type") or error.get("code")
    else:
        text, kind = error or body.get("message") or body.get("detail"), body.get("error_type")
    return str(text or ""), str(kind) if kind else None


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or an HTTP date)."""
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
