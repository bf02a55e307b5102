"""What the OpenAI-family providers (Chat Completions, Responses, and both on Azure) share.

``OpenAIFamilyProvider`` owns the SDK client (built lazily, once, with ``max_retries=0``:
Cascade's retries are the only ones), bounds every call with a ``CallGuard``, and turns
whatever the SDK raises into the taxonomy through ``translate_openai_error``. Subclasses write
``generate`` with three helpers: ``open`` (send the request), ``events`` (read a stream) and
``fail`` (translate an error, preferring the limit the guard enforced over the read error its
close caused).

Timeouts: the guard can abort a stream once its response headers arrived (it shuts the socket
down, which wakes a blocked read; closing alone does not). Before that - while the server
thinks, and for a whole non-streamed answer - the SDK call cannot be interrupted, so the HTTP
read timeout is set to the guard's ``first_read_timeout_s``. That read timeout applies to
every read of the stream, so with ``first_chunk_timeout_s`` set it also bounds the gap
between two events.
"""

from __future__ import annotations

import abc
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import httpx2
import openai

from providers import errors
from providers.base import ChatProvider, OnChunk, ProviderCall
from providers.guard import CallGuard
from providers.messages import read_secret
from providers.openai.errors import translate_openai_error
from settings.providers import AzureOpenAIConfig, OpenAIConfig
from tasks.contract.schemas import AssistantReply

logger = logging.getLogger(__name__)

OpenAIFamilyConfig = OpenAIConfig | AzureOpenAIConfig

# A connect that takes longer than this is a dead endpoint, whatever time the call has left.
CONNECT_TIMEOUT_S = 10.0
# A read timeout this close to the request's deadline is the deadline (the guard may not
# have woken yet to say so).
_DEADLINE_SLACK_S = 0.05
# What the SDK and its transport raise: status and stream errors, sockets, undecodable events.
SDK_ERRORS: tuple[type[BaseException], ...] = (
    openai.OpenAIError,
    httpx2.HTTPError,
    httpx2.StreamError,
    OSError,
    ValueError,
)

# Chat Completions parameters a request or a provider entry may set; anything else is dropped.
CHAT_KWARGS = frozenset(
    {
        "max_completion_tokens",
        "temperature",
        "top_p",
        "n",
        "stop",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "seed",
        "response_format",
        "reasoning_effort",
    }
)

T = TypeVar("T")


@dataclass
class Emitted:
    """How many chunks a call has passed to ``on_chunk`` so far (read when a read fails)."""

    chunks: int = 0


def chat_generation_kwargs(merged: dict[str, Any], stop_words: list[str], max_tokens_key: str) -> dict[str, Any]:
    """Chat Completions parameters from Cascade's ``generation_kwargs``.

    ``max_tokens`` is sent as ``max_tokens_key``; ``stop`` (a string or a list) is joined with
    the provider's ``stop_words``; keys outside ``CHAT_KWARGS`` are dropped, not forwarded.
    """
    params = {key: value for key, value in merged.items() if key in CHAT_KWARGS and value is not None}
    params.pop("max_completion_tokens", None)
    limit = output_limit(merged, "max_completion_tokens")
    if limit is not None:
        params[max_tokens_key] = limit
    stop = merged.get("stop")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    stops += [word for word in stop_words if word not in stops]
    if stops:
        params["stop"] = stops
    else:
        params.pop("stop", None)
    dropped = sorted(set(merged) - CHAT_KWARGS - {"max_tokens"})
    if dropped:
        logger.debug("generation_kwargs not sent to Chat Completions: %s", ", ".join(dropped))
    return params


def output_limit(merged: dict[str, Any], vendor_name: str) -> Any:
    """The cap on generated tokens: Cascade's ``max_tokens``, else the vendor's own name for it."""
    for key in ("max_tokens", vendor_name):
        if merged.get(key) is not None:
            return merged[key]
    return None


def request_timeout(guard: CallGuard) -> httpx2.Timeout:
    """The SDK call's timeout: reads bounded by the guard's limits, connects by ``CONNECT_TIMEOUT_S``."""
    read = guard.first_read_timeout_s
    return httpx2.Timeout(read, connect=min(CONNECT_TIMEOUT_S, read))


def stream_closer(stream: openai.Stream[Any]) -> Callable[[], None]:
    """A closer for the guard that interrupts a read blocked in another thread."""

    def close() -> None:
        network_stream = stream.response.extensions.get("network_stream")
        sock = network_stream.get_extra_info("socket") if network_stream is not None else None
        if isinstance(sock, socket.socket):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the server: the reader is waking up anyway
        stream.close()

    return close


class TimedCall(Protocol):
    """What the SDK helpers need of a call: the time left to its request's deadline."""

    def time_left(self) -> float:
        """Seconds until the request's deadline."""
        ...


class OpenAISdk:
    """The OpenAI SDK client of one provider entry, and the boundary its errors cross; shared
    by the chat providers (``OpenAIFamilyProvider``) and the image providers."""

    provider_id: str
    config: OpenAIConfig | AzureOpenAIConfig

    def init_sdk(self) -> None:
        """Start with no client: it is built on first use (so a missing key fails a call, not
        the worker)."""
        self._client: openai.OpenAI | None = None
        self._secrets: tuple[str, ...] = ()
        self._client_lock = threading.Lock()

    def build_client(self) -> tuple[openai.OpenAI, tuple[str, ...]]:
        """A new SDK client and the secrets it holds (scrubbed from error messages)."""
        cfg = self.config
        assert isinstance(cfg, OpenAIConfig), "Azure providers override build_client"
        # A local OpenAI-compatible server often needs no key; OpenAI itself always does.
        api_key = read_secret(self.provider_id, cfg.api_key_env, required=cfg.api_base_url is None)
        client = openai.OpenAI(
            api_key=api_key or "unused",
            organization=cfg.organization,
            project=cfg.project,
            base_url=cfg.api_base_url,
            max_retries=0,
            timeout=cfg.timeout_s,
        )
        return client, (api_key,) if api_key else ()

    def client(self) -> openai.OpenAI:
        """The provider's SDK client, built on first use (so a missing key fails a call, not
        the worker)."""
        with self._client_lock:
            if self._client is None:
                try:
                    self._client, self._secrets = self.build_client()
                except SDK_ERRORS as exc:  # a setting the SDK refuses (e.g. a malformed URL)
                    raise errors.ProviderUnavailable(
                        f"{self.provider_id}: cannot build the client ({type(exc).__name__})"
                    ) from None
            return self._client

    def open(self, guard: CallGuard, call: TimedCall, send: Callable[[], T]) -> T:
        """Send the request with ``send``, translating what the SDK raises."""
        try:
            return send()
        except SDK_ERRORS as exc:
            error = self.fail(exc, guard, call, emitted=0)
        # Not chained to the SDK's exception: it holds the request, and so the credentials.
        raise error from error.__cause__

    def events(self, guard: CallGuard, call: TimedCall, stream: openai.Stream[T], emitted: Emitted) -> Iterator[T]:
        """The events of ``stream`` under ``guard``; read errors come out translated.

        Only reading is guarded here: what the caller does with an event (``on_chunk``) runs
        in its own frame, so a ``Cancelled`` it raises propagates untouched.
        """
        guard.attach(stream_closer(stream))
        iterator = iter(stream)
        while True:
            error: errors.CascadeError | None = None
            try:
                event = next(iterator)
            except StopIteration:
                break
            except SDK_ERRORS as exc:
                error = self.fail(exc, guard, call, emitted.chunks)
            if error is not None:
                raise error from error.__cause__
            yield event
        fired = guard.failure()
        if fired is not None:  # the guard's close can look like a clean end
            error = self.fail(fired, guard, call, emitted.chunks)
            raise error from error.__cause__

    def fail(self, exc: BaseException, guard: CallGuard, call: TimedCall, emitted: int) -> errors.CascadeError:
        """The error to raise for ``exc``: the guard's limit if it fired, else the translation
        (a ``StreamInterrupted`` once chunks were emitted)."""
        fired = guard.failure()
        if isinstance(fired, errors.ProviderError):
            return self.interrupted(fired, emitted)
        if fired is not None:
            return fired  # the request's deadline: a stop, never a provider failure
        timed_out = isinstance(exc, openai.APITimeoutError | httpx2.TimeoutException)
        if timed_out and call.time_left() <= _DEADLINE_SLACK_S:
            return errors.DeadlineExceeded("the request's deadline passed")
        return self.interrupted(translate_openai_error(exc, self.provider_id, secrets=self._secrets), emitted)

    def interrupted(self, error: errors.ProviderError, emitted: int) -> errors.ProviderError:
        """``error`` as a ``StreamInterrupted`` when ``emitted`` chunks already went out."""
        if not emitted or isinstance(error, errors.StreamInterrupted):
            return error
        return errors.StreamInterrupted.after(error, emitted)


class OpenAIFamilyProvider(OpenAISdk, ChatProvider):
    """Base of the OpenAI-family providers; see the module docstring."""

    config: OpenAIFamilyConfig

    def __init__(self, provider_id: str, config: OpenAIFamilyConfig) -> None:
        super().__init__(provider_id, config)
        self.config = config
        self.init_sdk()

    # --- what subclasses adapt ----------------------------------------------------------

    @property
    def wire_model(self) -> str:
        """The ``model`` sent in the request body."""
        return self.config.model

    @property
    def max_tokens_key(self) -> str:
        """Chat Completions' name for ``max_tokens``.

        OpenAI wants ``max_completion_tokens`` (reasoning models reject ``max_tokens``); an
        OpenAI-compatible server at ``api_base_url`` (vLLM, TGI, llama.cpp, Ollama) may only
        know the older ``max_tokens``.
        """
        custom_server = isinstance(self.config, OpenAIConfig) and self.config.api_base_url is not None
        return "max_tokens" if custom_server else "max_completion_tokens"

    @abc.abstractmethod
    def generate(
        self, client: openai.OpenAI, call: ProviderCall, guard: CallGuard, on_chunk: OnChunk
    ) -> list[AssistantReply]:
        """Send the request and collect the replies, within ``guard``."""

    # --- the call -----------------------------------------------------------------------

    def run(self, call: ProviderCall, on_chunk: OnChunk) -> list[AssistantReply]:
        """Generate the replies for ``call``; raises only taxonomy errors (and whatever
        ``on_chunk`` raises)."""
        if call.time_left() <= 0:
            raise errors.DeadlineExceeded("the request's deadline passed")
        client = self.client()
        with CallGuard(call, self.config, self.provider_id) as guard:
            return self.generate(client, call, guard, on_chunk)

    def ended_early(self, emitted: int) -> errors.ProviderError:
        """The stream ended before its end marker (a cut connection)."""
        if emitted:
            return errors.StreamInterrupted(f"{self.provider_id}: the stream ended early (after {emitted} chunks)")
        return errors.ProviderConnectionError(f"{self.provider_id}: the stream ended before any answer")

    def translate(self, exc: BaseException, emitted: int) -> errors.ProviderError:
        """``exc`` (an error the API reported inside its answer) in the taxonomy."""
        return self.interrupted(translate_openai_error(exc, self.provider_id, secrets=self._secrets), emitted)
