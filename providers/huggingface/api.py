"""The ``hf_api`` provider: Hugging Face Inference Providers, Inference Endpoints and TGI.

All three go through ``huggingface_hub.InferenceClient.chat_completion`` (the Messages API:
``{url}/v1/chat/completions`` for an endpoint or TGI, the router for ``model`` + ``provider``).
A call makes exactly one HTTP request: ``chat_completion`` has no retry loop (not even for 503
"model loading") and huggingface_hub's shared ``httpx2`` client retries nothing.

Bounding a call: huggingface_hub keeps a streamed response in the client's ``exit_stack``, and
closing it from another thread does not wake a read blocked on its socket. So each call builds
its own ``InferenceClient`` whose ``exit_stack`` hands the response to the ``CallGuard``, which
shuts the socket down when a limit passes. Before the headers (and for a non-streamed answer)
there is nothing to shut down: the client's timeout, just past the guard's next limit, ends
that wait, and the guard, having fired first, names the limit.

Messages v2: the messages go in OpenAI's shape (content parts with ``image_url``, assistant
``tool_calls``, ``tool`` messages), which the router, TGI and Inference Endpoints all read;
``tools`` and ``tool_choice`` as chat completion's own (OpenAI's shape), ``parallel_tool_calls``
in the body when the request sets it, ``n`` as is. ``response_format`` goes in OpenAI's shape;
for a ``url`` (TGI, Inference Endpoints) huggingface_hub turns a ``json_schema`` into TGI's
grammar ``{type: "json_object", value: <schema>}``, and a ``json_object`` gets the object schema
as its ``value`` here, since TGI's grammar needs one. Streamed
``delta.tool_calls`` fragments (a list, or the single object older TGI versions send) go to
``on_chunk`` as tool-call fragments; TGI sends no call ids (``""``), so such a call gets a
fresh ``call_...`` id.

Credentials: a Hugging Face token (``HF_API_TOKEN``, ``HF_TOKEN``, huggingface_hub's own login)
goes only to Hugging Face: the serverless router and endpoints on Hugging Face hosts
(``HF_HOST_SUFFIXES``). A self-hosted URL (TGI, an endpoint anywhere else) gets a key only
when the provider entry names one with ``api_key_env``, and otherwise no ``Authorization``
header at all, not even the token huggingface_hub would add by itself.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import ChatCompletionInputStreamOptions, ChatCompletionStreamOutput, InferenceClient

from providers import errors
from providers.base import ChatProvider, OnChunk, ProviderCall
from providers.guard import CallGuard
from providers.huggingface.errors import HF_FAILURES, TIMEOUT_ERRORS, translate_hf_error
from providers.messages import (
    chat_tool_params,
    merge_generation_kwargs,
    read_secret,
    response_format_param,
    to_chat_messages,
    usage_from,
)
from providers.replies import ReplyAssembler
from settings.providers import HfApiConfig
from tasks.contract.schemas import AssistantReply, ResponseFormat

__all__ = ["HfApiProvider", "translate_hf_error"]

_T = TypeVar("_T")

# The generation kwargs chat_completion accepts that Cascade forwards; others are dropped.
_FORWARDED = ("max_tokens", "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "response_format")
# How much longer than the guard's next limit the HTTP client waits: enough for the guard to fire
# first, so the error names the limit (first chunk, timeout_s, deadline) rather than "read timeout".
_CLIENT_TIMEOUT_GRACE_S = 0.1
# Hosts run by Hugging Face (and their subdomains), the only ones a Hugging Face token goes to
# unless the provider entry names a key: the Hub, Inference Endpoints, Spaces.
HF_HOST_SUFFIXES = ("huggingface.co", "hf.co", "huggingface.cloud", "hf.space")
# huggingface_hub drops headers whose value is None after merging the client's headers over its
# own: this keeps out the token it would otherwise read from HF_TOKEN or its login file.
_NO_AUTHORIZATION: dict[str, Any] = {"authorization": None}


def is_hf_host(url: str | None) -> bool:
    """True if ``url`` is served by Hugging Face (see ``HF_HOST_SUFFIXES``)."""
    host = (urlsplit(url).hostname or "").lower().rstrip(".") if url else ""
    return any(host == suffix or host.endswith(f".{suffix}") for suffix in HF_HOST_SUFFIXES)


class HfApiProvider(ChatProvider):
    """Chat through ``InferenceClient.chat_completion``, streamed or not, bounded by ``CallGuard``."""

    config: HfApiConfig

    def __init__(self, provider_id: str, config: HfApiConfig) -> None:
        super().__init__(provider_id, config)
        self.config = config

    def run(self, call: ProviderCall, on_chunk: OnChunk) -> list[AssistantReply]:
        """One ``chat_completion`` call: stream the deltas to ``on_chunk`` when ``call.stream``."""
        cfg = self.config
        token = self._token()
        # A non-streamed answer arrives whole at the end: a time-to-first-chunk limit would cap
        # its length, so only timeout_s and the deadline bound it.
        limits = cfg if call.stream else cfg.model_copy(update={"first_chunk_timeout_s": None})
        with CallGuard(call, limits, self.provider_id) as guard:
            attempt = _Attempt(self.provider_id, call, guard, self._client(token, guard), [token] if token else [])
            try:
                if call.stream:
                    return self._stream(attempt, self.chat_kwargs(call), on_chunk)
                return self._complete(attempt, self.chat_kwargs(call))
            finally:
                attempt.client.exit_stack.close()  # what InferenceClient.close does, typed

    @property
    def sends_hf_token(self) -> bool:
        """True if the target is Hugging Face's, so a Hugging Face token may go to it."""
        return self.config.api_type == "serverless_inference_api" or is_hf_host(self.config.url)

    def _token(self) -> str | None:
        """The key to send (see the module docstring); raises ``AuthenticationFailed`` when the
        serverless API, which always needs one, has none."""
        cfg = self.config
        named = "api_key_env" in cfg.model_fields_set and cfg.api_key_env
        if not self.sends_hf_token:
            # A self-hosted server: only the key the operator named for it, and only if set.
            return read_secret(self.provider_id, cfg.api_key_env, required=False) if named else None
        # Serverless always needs a key; an endpoint often needs one, and a 401 still says so.
        serverless = cfg.api_type == "serverless_inference_api"
        return read_secret(self.provider_id, cfg.api_key_env, "HF_API_TOKEN", "HF_TOKEN", required=serverless)

    def chat_kwargs(self, call: ProviderCall) -> dict[str, Any]:
        """``chat_completion``'s keyword arguments: the config's generation kwargs overlaid by the
        request's, ``stop`` joined with the config's ``stop_words``, unknown keys dropped."""
        merged = merge_generation_kwargs(
            self.config.generation_kwargs, call.generation_kwargs, max_output_tokens=self.config.max_output_tokens
        )
        kwargs = {key: merged[key] for key in _FORWARDED if merged.get(key) is not None}
        if "max_tokens" not in kwargs and merged.get("max_new_tokens") is not None:
            kwargs["max_tokens"] = merged["max_new_tokens"]  # the HF name for the same limit
        stop = merged.get("stop") or []
        stop = list(dict.fromkeys([*([stop] if isinstance(stop, str) else stop), *self.config.stop_words]))
        if stop:
            kwargs["stop"] = stop
        if self.config.api_type != "serverless_inference_api" and self.config.model:
            kwargs["model"] = self.config.model  # the payload's "model"; the URL still picks the server
        tools = chat_tool_params(call.tools, call.tool_choice, None)
        kwargs.update(tools)
        if tools and call.parallel_tool_calls is not None:
            # chat_completion has no such argument: it goes in the body as it is.
            kwargs["extra_body"] = {"parallel_tool_calls": call.parallel_tool_calls}
        if call.response_format is not None:
            kwargs["response_format"] = self._response_format(call.response_format)
        if call.n is not None:
            kwargs["n"] = call.n
        return kwargs

    def _response_format(self, response_format: ResponseFormat) -> dict[str, Any]:
        """``response_format`` as the target reads it (see the module docstring)."""
        param = response_format_param(response_format)
        if self.config.api_type != "serverless_inference_api" and response_format.type == "json_object":
            param["value"] = {"type": "object"}  # TGI's grammar needs a schema, any object here
        return param

    def _client(self, token: str | None, guard: CallGuard) -> InferenceClient:
        cfg = self.config
        timeout = guard.first_read_timeout_s + _CLIENT_TIMEOUT_GRACE_S
        if cfg.api_type == "serverless_inference_api":
            # provider None means the router's own choice ("auto"), with no Hub lookup.
            client = InferenceClient(model=cfg.model, provider=cast(Any, cfg.provider), token=token, timeout=timeout)
        else:
            # Without a key of its own, no Authorization header (see the module docstring).
            headers = None if token or self.sends_hf_token else _NO_AUTHORIZATION
            client = InferenceClient(base_url=cfg.url, token=token, timeout=timeout, headers=headers)
        client.exit_stack = _ResponseTrap(lambda response: guard.attach(lambda: _shut_down(response)))
        return client

    def _stream(self, attempt: _Attempt, kwargs: dict[str, Any], on_chunk: OnChunk) -> list[AssistantReply]:
        assembler = ReplyAssembler(on_chunk, self.config.model or "unknown")
        usage = None
        outputs = attempt.outputs(kwargs)
        while (output := _next(outputs, assembler.emitted)) is not None:
            assembler.model = output.model or assembler.model
            if output.usage:  # TGI 2 puts it on the last token's chunk, TGI 3 on a chunk of its own
                usage = usage_from(output.usage.prompt_tokens, output.usage.completion_tokens)
            for choice in output.choices or []:
                index = choice.index or 0
                assembler.choice(index)
                assembler.finish(index, choice.finish_reason)
                delta = choice.delta
                if delta is None:
                    continue
                assembler.text(index, delta.content or "")
                for fragment in _fragments(delta.tool_calls):
                    function = fragment.function
                    assembler.tool_call(
                        index,
                        fragment.index or 0,
                        call_id=fragment.id,
                        name=function.name if function else None,
                        arguments=function.arguments if function else None,
                    )
        # The hub's iterator ends quietly at "[DONE]" and at a closed connection alike: only a
        # finish_reason for every reply tells a whole answer from a cut one.
        finished = [index for index in assembler.indexes if assembler.finish_reason(index)]
        if not finished or len(finished) < len(assembler.indexes):
            emitted = assembler.emitted
            fired = attempt.guard.failure()
            if fired is not None:
                raise _interrupted(fired, emitted) if emitted and isinstance(fired, errors.ProviderError) else fired
            if emitted:
                raise errors.StreamInterrupted(f"{self.provider_id}: stream ended with no finish_reason")
            raise errors.ProviderConnectionError(f"{self.provider_id}: the stream ended before any chunk")
        return assembler.replies(usage or usage_from(None, None))

    def _complete(self, attempt: _Attempt, kwargs: dict[str, Any]) -> list[AssistantReply]:
        messages = to_chat_messages(attempt.call.messages)
        try:
            output = attempt.client.chat_completion(messages, stream=False, **kwargs)
        except HF_FAILURES as exc:
            raise attempt.failure(exc) from exc
        if not output.choices:
            raise errors.ServerError(f"{self.provider_id}: the answer holds no choices")
        usage = usage_from(output.usage.prompt_tokens, output.usage.completion_tokens) if output.usage else None
        # The runner publishes nothing of a non-streamed answer: it gets no chunks.
        assembler = ReplyAssembler(lambda _chunk: None, output.model or self.config.model or "unknown")
        for number, choice in enumerate(output.choices):
            index = choice.index if choice.index is not None else number
            assembler.choice(index)
            assembler.finish(index, choice.finish_reason)
            message = choice.message
            if message is None:
                continue
            assembler.text(index, message.content or "")
            for position, call in enumerate(message.tool_calls or []):
                function = call.function
                arguments = (
                    function.arguments if isinstance(function.arguments, str) else json.dumps(function.arguments)
                )
                assembler.tool_call(index, position, call_id=call.id, name=function.name, arguments=arguments)
        return assembler.replies(usage or usage_from(None, None))


def _fragments(tool_calls: Any) -> list[Any]:
    """The tool-call fragments of a delta: a list, or the one object older TGI versions send."""
    if tool_calls is None:
        return []
    return list(tool_calls) if isinstance(tool_calls, list) else [tool_calls]


@dataclass(frozen=True)
class _Attempt:
    """One call in flight: its client, its guard, and the secrets to keep out of messages."""

    provider_id: str
    call: ProviderCall
    guard: CallGuard
    client: InferenceClient
    secrets: list[str]

    def outputs(self, kwargs: dict[str, Any]) -> Iterator[ChatCompletionStreamOutput]:
        """``chat_completion``'s stream with its failures translated; tells the guard of text."""
        messages = to_chat_messages(self.call.messages)
        options = ChatCompletionInputStreamOptions(include_usage=True)
        try:
            for output in self.client.chat_completion(messages, stream=True, stream_options=options, **kwargs):
                if any(
                    choice.delta and (choice.delta.content or choice.delta.tool_calls)
                    for choice in output.choices or []
                ):
                    self.guard.chunk_received()  # raises the limit that fired, if one did
                yield output
        except HF_FAILURES as exc:
            raise self.failure(exc) from exc

    def failure(self, exc: BaseException) -> errors.CascadeError:
        """The guard's limit if one fired (the read failed because the guard cut it), else the
        translation of ``exc``."""
        fired = self.guard.failure()
        if fired is None and isinstance(exc, TIMEOUT_ERRORS) and self.call.time_left() <= 0:
            # The client's timeout beat the guard's thread to the request's deadline.
            fired = errors.DeadlineExceeded("the request's deadline passed")
        return fired or translate_hf_error(exc, self.provider_id, secrets=self.secrets)


def _next(outputs: Iterator[_T], emitted: int) -> _T | None:
    """The next output; a provider failure after chunks were streamed becomes a
    ``StreamInterrupted`` (a retry would replay text subscribers already saw)."""
    try:
        return next(outputs, None)
    except errors.ProviderError as exc:
        if not emitted or isinstance(exc, errors.StreamInterrupted):
            raise
        raise _interrupted(exc, emitted) from exc


def _interrupted(error: errors.ProviderError, emitted: int) -> errors.StreamInterrupted:
    """``error`` as the ``StreamInterrupted`` it is once ``emitted`` chunks went out."""
    return errors.StreamInterrupted.after(error, emitted)


class _ResponseTrap(ExitStack):
    """The ``exit_stack`` of an ``InferenceClient``: huggingface_hub enters each streamed
    response into it, and this hands that response to ``on_response`` as it does."""

    def __init__(self, on_response: Callable[[httpx2.Response], None]) -> None:
        super().__init__()
        self._on_response = on_response

    def enter_context(self, cm: AbstractContextManager[_T]) -> _T:
        """Enter ``cm`` as ``ExitStack`` does; report it if it is an HTTP response."""
        entered = super().enter_context(cm)
        if isinstance(entered, httpx2.Response):
            self._on_response(entered)
        return entered


def _shut_down(response: httpx2.Response) -> None:
    """End a read blocked on ``response`` now, from another thread."""
    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if isinstance(sock, socket.socket):
        # shutdown() wakes a blocked recv(); close() would not. The plain socket method, because
        # SSLSocket.shutdown drops the TLS state the reading thread is still using.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    else:
        response.close()
