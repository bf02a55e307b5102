"""The one boundary where the ``openai`` SDK's exceptions become Cascade's taxonomy.

``translate_openai_error`` maps transport failures (an ``httpx2`` error that surfaced through
the SDK) itself; for an error answer (an HTTP error status, or an error the API reported inside
a 200 answer) it pulls out the status, headers, the vendor's error ``code`` / ``type`` and its
own message, and leaves their meaning to the shared table in ``providers.http_errors``. The
message it builds holds the status, the vendor's code and the vendor's own message, truncated
and scrubbed by ``http_errors.scrub``: never a key, an ``Authorization`` value or a URL with
credentials.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Mapping
from typing import Any

import httpx2
import openai

from providers import errors, http_errors


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
        text = _describe(provider_id, status, code or kind, http_errors.scrub(message, secrets))
        return http_errors.classify(text, status=status, codes=(code, kind), vendor_message=message, headers=headers)
    return errors.ServerError(f"{provider_id}: unreadable answer from the provider ({type(exc).__name__})")


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
