"""Cascade's error taxonomy: every failure a request can meet, and what the chain does about it.

Providers translate their vendor's exceptions into these classes at one boundary (the
provider module's ``translate_*`` function); everything above the providers sees only this
tree. Each class has a stable ``code`` that appears as ``error_type`` in events, attempts and
replies.

::

    CascadeError
    ├── RequestError ················· request-fatal: no provider is tried, reply "failed"
    │   ├── InvalidRequest               invalid_request
    │   ├── UnknownChain                 unknown_chain
    │   └── RequestTooLarge              request_too_large
    ├── RequestStopped ··············· stop at once; never a reason to fall back
    │   ├── DeadlineExceeded             deadline_exceeded   (the request's timeout_s)
    │   ├── TimeLimitExceeded            time_limit          (Celery's soft time limit)
    │   └── Cancelled                    cancelled           (cascade:cancel:{id} was set)
    └── ProviderError ················ one provider call failed; the chain decides
        ├── TransientError ··········· retry the same provider (backoff + jitter), then fall through
        │   ├── RateLimited              rate_limited        (.retry_after_s honoured)
        │   ├── ProviderTimeout          timeout
        │   ├── ProviderConnectionError  connection_error
        │   ├── ServerError              server_error        (.status_code)
        │   └── Overloaded               overloaded
        ├── FatalProviderError ······· fall through at once, no retry
        │   ├── AuthenticationFailed     auth
        │   ├── UnknownModel             unknown_model
        │   ├── ContextLengthExceeded    context_length
        │   ├── ContentFiltered          content_filter
        │   ├── BadProviderRequest       bad_request
        │   ├── ProviderUnavailable      provider_unavailable (in cooldown, not configured)
        │   ├── Unsupported              unsupported         (lacks tools / images / a JSON schema / n)
        │   └── InvalidOutput            invalid_output      (the answer fails its response_format)
        └── StreamInterrupted ········ failed after chunks were streamed: fallback event,
                                         the next provider starts from scratch   stream_interrupted

A ``TransientError`` raised after the provider already streamed chunks is treated like
``StreamInterrupted``: retrying would replay text the subscriber has already seen.

Messages must never contain secrets: providers build them from status codes and vendor error
codes, never from request headers or URLs with credentials.
"""

from __future__ import annotations


class CascadeError(Exception):
    """Base of every error Cascade raises on purpose."""

    code = "internal_error"

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.__class__.__doc__ or self.code)

    @property
    def message(self) -> str:
        """The human-readable message (never holds a secret)."""
        return str(self.args[0]) if self.args else self.code


# --- request-fatal -------------------------------------------------------------------------


class RequestError(CascadeError):
    """The request itself cannot be served; no provider is tried."""

    code = "invalid_request"


class InvalidRequest(RequestError):
    """The request does not validate against ChatRequest."""

    code = "invalid_request"


class UnknownChain(RequestError):
    """The request names a chain this deployment does not define."""

    code = "unknown_chain"


class RequestTooLarge(RequestError):
    """The request exceeds the worker's limits on messages or characters."""

    code = "request_too_large"


# --- stops ---------------------------------------------------------------------------------


class RequestStopped(CascadeError):
    """The request must end now, whatever provider is running."""

    code = "stopped"


class DeadlineExceeded(RequestStopped):
    """The request's own deadline (timeout_s) passed."""

    code = "deadline_exceeded"


class TimeLimitExceeded(RequestStopped):
    """The worker's soft time limit for a task was reached."""

    code = "time_limit"


class Cancelled(RequestStopped):
    """The producer cancelled the request."""

    code = "cancelled"


# --- provider failures ---------------------------------------------------------------------


class ProviderError(CascadeError):
    """A provider call failed."""

    code = "provider_error"


class TransientError(ProviderError):
    """A failure that may go away if the same provider is asked again."""

    code = "transient"


class RateLimited(TransientError):
    """The provider answered 429; ``retry_after_s`` is its Retry-After, if it sent one."""

    code = "rate_limited"

    def __init__(self, message: str = "", retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ProviderTimeout(TransientError):
    """The provider did not answer (or did not send the next chunk) in time."""

    code = "timeout"


class ProviderConnectionError(TransientError):
    """The connection to the provider failed or was reset."""

    code = "connection_error"


class ServerError(TransientError):
    """The provider answered with a 5xx status."""

    code = "server_error"

    def __init__(self, message: str = "", status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class Overloaded(TransientError):
    """The provider said it is overloaded (e.g. 529, or an 'overloaded' error code)."""

    code = "overloaded"


class FatalProviderError(ProviderError):
    """A failure that asking the same provider again will not fix."""

    code = "provider_fatal"


class AuthenticationFailed(FatalProviderError):
    """401/403: missing, wrong or unauthorised credentials."""

    code = "auth"


class UnknownModel(FatalProviderError):
    """404: the model or deployment does not exist."""

    code = "unknown_model"


class ContextLengthExceeded(FatalProviderError):
    """The conversation is longer than the model's context window."""

    code = "context_length"


class ContentFiltered(FatalProviderError):
    """The provider's content filter refused the prompt or the completion."""

    code = "content_filter"


class BadProviderRequest(FatalProviderError):
    """Any other 400: the provider rejected the request as sent to it."""

    code = "bad_request"


class ProviderUnavailable(FatalProviderError):
    """The provider cannot be used now (cooling down after failures, or not configured)."""

    code = "provider_unavailable"


class Unsupported(FatalProviderError):
    """The provider cannot take what the request needs (tools, images, a JSON schema, several
    choices): the chain skips it, which is never a cooldown failure."""

    code = "unsupported"


class InvalidOutput(FatalProviderError):
    """The answer does not meet the request's ``response_format`` (not JSON, not an object, or
    not valid against the schema): its text is void and the chain goes on."""

    code = "invalid_output"


class StreamInterrupted(ProviderError):
    """The provider failed after it had streamed chunks (cut connection, error event inside
    a 200 stream, stream ended without its end marker)."""

    code = "stream_interrupted"

    @classmethod
    def after(cls, error: ProviderError, chunks: int) -> StreamInterrupted:
        """``error`` as the ``StreamInterrupted`` it is once ``chunks`` chunks went out (a retry
        would replay text subscribers already saw); ``error`` is its ``__cause__``."""
        interrupted = cls(f"{error.message} (after {chunks} chunks)")
        interrupted.__cause__ = error
        return interrupted


def counts_against_provider(exc: BaseException) -> bool:
    """True if ``exc`` says the provider is unhealthy (and so counts toward its cooldown).

    Failures caused by the request itself (too long, filtered, rejected) do not count.
    """
    request_specific = (
        ContextLengthExceeded,
        ContentFiltered,
        BadProviderRequest,
        ProviderUnavailable,
        Unsupported,
        InvalidOutput,
    )
    return isinstance(exc, ProviderError) and not isinstance(exc, request_specific)


def error_code(exc: BaseException) -> str:
    """The taxonomy code of ``exc`` (``internal_error`` for anything outside the tree).

    Celery's ``SoftTimeLimitExceeded`` (raised into the running task, so it reaches the chain
    before the task turns it into ``TimeLimitExceeded``) is ``time_limit``; it is matched by
    name so that providers do not import Celery.
    """
    if isinstance(exc, CascadeError):
        return exc.code
    if type(exc).__name__ == "SoftTimeLimitExceeded":
        return TimeLimitExceeded.code
    return "internal_error"
