"""The one table from an HTTP error answer to Cascade's taxonomy, shared by every provider.

Each provider's error module (``openai_errors``, ``hf_errors``) knows only how to pull the
status, headers, vendor error codes and vendor message out of its SDK's exception; this module
decides what they mean (``classify``), how long a rate-limited caller waits (``retry_after_s``)
and what of the vendor's words may appear in a message (``scrub``).

``classify`` reads the rows below top to bottom; the first that matches wins. A row matches on
its status, or on *evidence* (a vendor error ``code``/``type`` in its family, or the vendor's
message matching its pattern) when the status is in the row's evidence range: *client* (no
status, or 4xx), *server* (no status, or 5xx) or *payload* (no status: an error reported
inside a 200 answer or stream).

=====================  ============  =========================================  ==========
taxonomy               status        evidence (family, message)                 counts if
=====================  ============  =========================================  ==========
ContextLengthExceeded  413           context length; "maximum context", TGI's   client
                                     "must have less than N tokens", ...
ContentFiltered        --            content filter / policy violation          client
Overloaded             529, 503 [1]  overloaded; "overloaded", "is loading",    server
                                     "too busy"
RateLimited [2]        429           rate limit                                 payload
AuthenticationFailed   401, 403      auth                                       payload
UnknownModel           404           not found                                  payload
ProviderTimeout        408           timeout                                    payload
BadProviderRequest     --            TGI's ``validation``                       payload
ServerError [3]        409, 424,     --                                         --
                       5xx, <400,
                       no status
BadProviderRequest     other 4xx     --                                         --
=====================  ============  =========================================  ==========

[1] A bare 503 is ``Overloaded`` for vendors that use it only for that (OpenAI, Azure); a
    vendor whose 503 also means an outage (Hugging Face's router) passes
    ``plain_503_is_overloaded=False`` and gets ``ServerError`` unless the evidence says
    overloaded. [2] Carries ``retry_after_s``. [3] Carries ``status_code``; 409 is a lock
    conflict OpenAI asks clients to retry, 424 is TGI's "generation failed"; with no status
    it is an error inside a 200 answer, most often a hiccup on the vendor's side.

``retry_after_s`` reads ``retry-after-ms`` (milliseconds), then ``retry-after`` (seconds or an
HTTP date); a date in the past is 0, anything unreadable or non-finite is no hint (``None``).

``scrub`` puts a vendor message on one line of at most ``MAX_VENDOR_MESSAGE`` characters with
every configured secret and anything shaped like a credential replaced by ``REDACTED``:
``Bearer``/``Basic`` values, ``sk-``/``rk-``/``pk-``/``sess-`` keys (masked ones too),
``hf_`` tokens, JWTs, ``key=``/``token:``-style values and the user part of URLs.
"""

from __future__ import annotations

import email.utils
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC

from providers import errors

MAX_VENDOR_MESSAGE = 300
REDACTED = "[redacted]"

# Vendor codes and types, lower-cased. OpenAI, Azure, TGI and OpenAI-compatible servers
# disagree on spelling, so each family lists the words seen in the wild.
CONTEXT_CODES = frozenset({"context_length_exceeded", "string_above_max_length_tokens", "request_too_large"})
FILTER_CODES = frozenset(
    {
        "content_filter",
        "content_policy_violation",
        "responsibleaipolicyviolation",
        "image_content_policy_violation",
        "moderation_blocked",  # the GPT image models' refusal of a prompt
        "bio_policy",
        "misalignment_policy_violation",
    }
)
OVERLOADED_CODES = frozenset({"overloaded", "overloaded_error", "server_overloaded", "engine_overloaded"})
RATE_CODES = frozenset({"rate_limit_exceeded", "rate_limit_error", "rate_limited", "too_many_requests"})
AUTH_CODES = frozenset({"invalid_api_key", "authentication_error", "permission_error", "unauthorized"})
NOT_FOUND_CODES = frozenset({"model_not_found", "deploymentnotfound", "not_found_error", "not_found"})
TIMEOUT_CODES = frozenset({"timeout", "request_timeout", "vector_store_timeout"})
BAD_REQUEST_CODES = frozenset({"validation"})  # TGI's error_type for a rejected input

# TGI says "`inputs` tokens + `max_new_tokens` must be <= 4096" and "`inputs` must have less
# than 4096 tokens"; the rest is how OpenAI and the servers behind HF's router word it.
CONTEXT_MESSAGE = re.compile(
    r"tokens \+ `max_new_tokens` must be <=|must have less than \d+ tokens|context[ _]length|context window"
    r"|maximum context|too many (input )?tokens|(input|prompt) is too long",
    re.IGNORECASE,
)
# HF's serverless answers 503 "Model ... is currently loading" while it cold-starts a model.
OVERLOADED_MESSAGE = re.compile(r"overloaded|is (currently )?loading|too busy", re.IGNORECASE)


def _client(status: int | None) -> bool:
    return status is None or 400 <= status < 500


def _server(status: int | None) -> bool:
    return status is None or status >= 500


def _payload(status: int | None) -> bool:
    return status is None


@dataclass(frozen=True)
class _Row:
    """One row of the table: ``error`` when the status is in ``statuses``, or when the status
    is in the evidence range and a vendor code is in ``codes`` or the message matches."""

    error: type[errors.ProviderError]
    statuses: frozenset[int]
    codes: frozenset[str]
    evidence_counts: Callable[[int | None], bool]
    message: re.Pattern[str] | None = None
    bare_503: bool = False  # also matches a 503 for vendors whose 503 means only this


_ROWS: tuple[_Row, ...] = (
    _Row(errors.ContextLengthExceeded, frozenset({413}), CONTEXT_CODES, _client, CONTEXT_MESSAGE),
    _Row(errors.ContentFiltered, frozenset(), FILTER_CODES, _client),
    _Row(errors.Overloaded, frozenset({529}), OVERLOADED_CODES, _server, OVERLOADED_MESSAGE, bare_503=True),
    _Row(errors.RateLimited, frozenset({429}), RATE_CODES, _payload),
    _Row(errors.AuthenticationFailed, frozenset({401, 403}), AUTH_CODES, _payload),
    _Row(errors.UnknownModel, frozenset({404}), NOT_FOUND_CODES, _payload),
    _Row(errors.ProviderTimeout, frozenset({408}), TIMEOUT_CODES, _payload),
    _Row(errors.BadProviderRequest, frozenset(), BAD_REQUEST_CODES, _payload),
    _Row(errors.ServerError, frozenset({409, 424}), frozenset(), _payload),
)


def classify(
    text: str,
    *,
    status: int | None,
    codes: Iterable[str | None] = (),
    vendor_message: str = "",
    headers: Mapping[str, str] | None = None,
    plain_503_is_overloaded: bool = True,
) -> errors.ProviderError:
    """The taxonomy error, with message ``text``, for an error answer (see the table above).

    ``status`` is ``None`` for an error reported inside a 200 answer; ``codes`` are the
    vendor's error code and type; ``vendor_message`` is its own (unscrubbed) words, read only
    to classify; ``headers`` give a 429 its ``retry_after_s``.
    """
    words = frozenset(code.lower() for code in codes if code)
    error = _match(status, words, vendor_message, plain_503_is_overloaded)
    if error is errors.RateLimited:
        return errors.RateLimited(text, retry_after_s=retry_after_s(headers))
    if error is errors.ServerError:
        return errors.ServerError(text, status_code=status)
    return error(text)


def _match(
    status: int | None, words: frozenset[str], message: str, plain_503_is_overloaded: bool
) -> type[errors.ProviderError]:
    for row in _ROWS:
        if status in row.statuses or (row.bare_503 and plain_503_is_overloaded and status == 503):
            return row.error
        if row.evidence_counts(status) and (
            words & row.codes or (row.message is not None and row.message.search(message))
        ):
            return row.error
    if status is None or status >= 500 or status < 400:
        return errors.ServerError
    return errors.BadProviderRequest


def retry_after_s(headers: Mapping[str, str] | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date),
    never negative; ``None`` when neither is there or readable. ``now`` is the epoch time an
    HTTP date is measured from (the clock's, unless a test fixes it)."""
    if not headers:
        return None
    lowered = {name.lower(): value for name, value in headers.items()}
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = lowered.get(name, "").strip()
        if not value:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            seconds = _seconds_until(value, now) if name == "retry-after" else math.nan
        if math.isfinite(seconds):
            return max(0.0, seconds)
    return None


def _seconds_until(http_date: str, now: float | None) -> float:
    try:
        when = email.utils.parsedate_to_datetime(http_date)
    except (TypeError, ValueError, IndexError, OverflowError):
        return math.nan
    if when.tzinfo is None:  # "-0000" or no zone: HTTP dates are in GMT
        when = when.replace(tzinfo=UTC)
    return when.timestamp() - (time.time() if now is None else now)


_SECRET_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # The replacement keeps a label ("Bearer ", "key=", "https://") so the message still reads.
    (re.compile(r"(?i)(bearer|basic)(\s+)\S+"), rf"\1\2{REDACTED}"),
    (re.compile(r"\b(?:sk|rk|pk|sess)-[A-Za-z0-9_*.\-]{4,}"), REDACTED),  # OpenAI echoes masked keys
    (re.compile(r"(?i)hf_[A-Za-z0-9]{8,}"), REDACTED),
    (re.compile(r"\beyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.?[A-Za-z0-9_\-]*"), REDACTED),  # JWTs (Azure AD)
    (
        re.compile(r"(?i)\b(api[-_]?key|access[-_]?token|token|key|sig|secret|password)(\s*[=:]\s*)[^&\s,;\"']+"),
        rf"\1\2{REDACTED}",
    ),
    (re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/\s@]+@"), rf"\1{REDACTED}@"),
)


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` on one line, at most ``MAX_VENDOR_MESSAGE`` characters, with ``secrets`` and
    anything shaped like a credential replaced by ``REDACTED``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    text = " ".join(text.split())
    if len(text) > MAX_VENDOR_MESSAGE:
        text = text[: MAX_VENDOR_MESSAGE - 3] + "..."
    return text
