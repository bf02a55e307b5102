"""The one boundary between huggingface_hub's exceptions and Cascade's error taxonomy.

``InferenceClient.chat_completion`` raises ``HfHubHTTPError`` (with the ``httpx2`` response)
for an error status, a ``TextGenerationError`` subclass for an error event inside a 200 stream
(TGI's ``data: {"error": ..., "error_type": ...}``), ``InferenceTimeoutError`` when the request
times out before the response, raw ``httpx2`` transport errors while a stream is read, and
``ValueError`` when it cannot build the request (no provider mapping, no key) or decode a line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

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

from providers import errors, http_errors

_UNKNOWN_MODEL = re.compile(r"not supported by provider|no provider mapping|not supported for task", re.IGNORECASE)
_NO_KEY = re.compile(r"api[_ ]?key|log in", re.IGNORECASE)

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
    text scrubbed of ``secrets`` and anything token-like; never a URL or a request header.
    What a status, an ``error_type`` or the server's words mean is ``http_errors``' table.
    """
    if isinstance(exc, errors.ProviderError):
        return exc
    if isinstance(exc, HfHubHTTPError):
        return _from_response(exc.response, provider_id, secrets)
    if isinstance(exc, TextGenerationError):
        error_type = next((name for cls, name in _TGI_ERROR_TYPES.items() if isinstance(exc, cls)), None)
        text = f"{provider_id}: error in stream ({error_type}): {http_errors.scrub(str(exc), secrets)}"
        return http_errors.classify(text, status=None, codes=(error_type,), vendor_message=str(exc))
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
        detail = http_errors.scrub(str(exc), secrets)
        message = f"{provider_id}: huggingface_hub refused the call: {detail}"
        if _UNKNOWN_MODEL.search(detail):
            return errors.UnknownModel(message)
        if _NO_KEY.search(detail):
            return errors.AuthenticationFailed(message)
        return errors.BadProviderRequest(message)
    return errors.ProviderError(f"{provider_id}: unexpected {type(exc).__name__} from huggingface_hub")


def _from_response(response: httpx2.Response, provider_id: str, secrets: Sequence[str]) -> errors.ProviderError:
    status = response.status_code
    detail, error_type, codes = _server_error(response)
    scrubbed = http_errors.scrub(detail, secrets)
    message = (
        f"{provider_id}: HTTP {status}"
        + (f" ({error_type})" if error_type else "")
        + (f": {scrubbed}" if scrubbed else "")
    )
    # HF's router answers a bare 503 for an outage as well as for an overloaded model.
    return http_errors.classify(
        message,
        status=status,
        codes=codes,
        vendor_message=detail,
        headers=response.headers,
        plain_503_is_overloaded=False,
    )


def _server_error(response: httpx2.Response) -> tuple[str, str | None, tuple[str | None, ...]]:
    """The error text, the type to show and every code/type word of an error body: TGI's
    ``{error, error_type}`` or OpenAI's ``{error: {message, type, code}}``."""
    try:
        body = response.json()
    except (ValueError, RuntimeError):  # not JSON, or a stream that was never read
        return "", None, ()
    if not isinstance(body, dict):
        return "", None, ()
    error = body.get("error")
    codes: tuple[str | None, ...]
    if isinstance(error, dict):
        text, codes = error.get("message"), (_word(error.get("type")), _word(error.get("code")))
    else:
        text, codes = error or body.get("message") or body.get("detail"), (_word(body.get("error_type")),)
    return str(text or ""), next((code for code in codes if code), None), codes


def _word(value: object) -> str | None:
    return str(value) if value else None
