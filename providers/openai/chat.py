"""The ``openai`` provider: Chat Completions on OpenAI or any OpenAI-compatible server.

Streaming asks for ``stream_options={"include_usage": True}`` and calls ``on_chunk`` once per
non-empty delta, with the choice's ``index`` and ``meta={model, finish_reason}``. A stream is
complete when every choice (``n`` of them) has a ``finish_reason``; one that ends before (a
cut connection, a missing end) is a ``StreamInterrupted`` once chunks went out, else a
``ProviderConnectionError``. A ``content_filter`` finish is a ``ContentFiltered`` failure.

Without streaming (``call.stream`` false) it sends one request and then calls ``on_chunk``
once per reply with the whole text, so the runner still learns when the answer arrived (its
time to first token) and gets its chance to notice a cancel; the runner publishes no deltas
for a request that did not ask to stream.

A refusal (structured outputs) is reported as the reply's text: it is the model's answer.

Messages v2 go out as they are (content parts with ``image_url``, assistant ``tool_calls``,
``tool`` messages: Chat Completions' own shape), with the request's ``tools``, ``tool_choice``,
``parallel_tool_calls``, ``response_format`` and ``n``. Streamed
``delta.tool_calls[i].function.arguments`` fragments go to ``on_chunk`` as tool-call fragments
of their choice; a reply that calls tools has finish_reason ``tool_calls``.
"""

from __future__ import annotations

from typing import Any, cast

import openai
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageParam

from providers.base import OnChunk, ProviderCall
from providers.guard import CallGuard
from providers.messages import (
    chat_tool_params,
    merge_generation_kwargs,
    response_format_param,
    to_chat_messages,
    usage_from,
)
from providers.openai.common import Emitted, OpenAIFamilyProvider, chat_generation_kwargs, request_timeout
from providers.openai.errors import OpenAIPayloadError
from providers.replies import ReplyAssembler
from tasks.contract.schemas import AssistantReply, Usage


class OpenAIChatProvider(OpenAIFamilyProvider):
    """``type = "openai"``; see the module docstring."""

    def generate(
        self, client: openai.OpenAI, call: ProviderCall, guard: CallGuard, on_chunk: OnChunk
    ) -> list[AssistantReply]:
        """Send one Chat Completions request (streamed or not) and collect its replies."""
        params = self.chat_params(call)
        messages = cast("list[ChatCompletionMessageParam]", to_chat_messages(call.messages))
        timeout = request_timeout(guard)
        completions = client.chat.completions
        if not call.stream:
            completion = self.open(
                guard,
                call,
                lambda: completions.create(model=self.wire_model, messages=messages, timeout=timeout, **params),
            )
            return self._from_completion(completion, on_chunk)
        stream = self.open(
            guard,
            call,
            lambda: completions.create(
                model=self.wire_model,
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
                timeout=timeout,
                **params,
            ),
        )
        with stream:  # closed at once on any exit, a cancel from on_chunk included
            return self._from_stream(stream, call, guard, on_chunk, expected=_choice_count(params))

    def chat_params(self, call: ProviderCall) -> dict[str, Any]:
        """The request's parameters besides ``model`` and ``messages``."""
        merged = merge_generation_kwargs(
            self.config.generation_kwargs, call.generation_kwargs, max_output_tokens=self.config.max_output_tokens
        )
        params = chat_generation_kwargs(merged, self.config.stop_words, self.max_tokens_key)
        params.update(chat_tool_params(call.tools, call.tool_choice, call.parallel_tool_calls))
        if call.response_format is not None:
            params["response_format"] = response_format_param(call.response_format)
        if call.n is not None:
            params["n"] = call.n
        return params

    def _from_stream(
        self,
        stream: openai.Stream[ChatCompletionChunk],
        call: ProviderCall,
        guard: CallGuard,
        on_chunk: OnChunk,
        expected: int,
    ) -> list[AssistantReply]:
        assembler = ReplyAssembler(on_chunk, self.wire_model)
        usage = Usage()
        emitted = Emitted()
        for chunk in self.events(guard, call, stream, emitted):
            assembler.model = chunk.model or assembler.model  # Azure's prompt-filter chunk has an empty model
            if chunk.usage is not None:
                usage = usage_from(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
            for choice in chunk.choices or []:
                assembler.choice(choice.index)
                assembler.finish(choice.index, choice.finish_reason)
                delta = choice.delta
                if delta is None:
                    continue
                text = delta.content or delta.refusal
                if text:
                    guard.chunk_received()
                    assembler.text(choice.index, text)
                for fragment in delta.tool_calls or []:
                    guard.chunk_received()
                    function = fragment.function
                    assembler.tool_call(
                        choice.index,
                        fragment.index,
                        call_id=fragment.id,
                        name=function.name if function else None,
                        arguments=function.arguments if function else None,
                    )
                emitted.chunks = assembler.emitted
        if not all(assembler.finish_reason(index) for index in range(expected)):
            raise self.ended_early(assembler.emitted)
        finish_reasons = {index: assembler.finish_reason(index) for index in assembler.indexes}
        self._check_filtered(finish_reasons, assembler.emitted)
        # Usage is the request's, all choices together: the API does not split it per choice.
        return assembler.replies(usage)

    def _from_completion(self, completion: ChatCompletion, on_chunk: OnChunk) -> list[AssistantReply]:
        if not completion.choices:
            raise self.translate(OpenAIPayloadError("the answer held no choices"), emitted=0)
        self._check_filtered({choice.index: choice.finish_reason for choice in completion.choices}, emitted=0)
        assembler = ReplyAssembler(on_chunk, completion.model or self.wire_model)
        usage = Usage()
        if completion.usage is not None:
            usage = usage_from(completion.usage.prompt_tokens, completion.usage.completion_tokens)
        for choice in sorted(completion.choices, key=lambda choice: choice.index):
            assembler.choice(choice.index)
            assembler.finish(choice.index, choice.finish_reason)
            assembler.text(choice.index, choice.message.content or choice.message.refusal or "")
            for position, tool_call in enumerate(choice.message.tool_calls or []):
                function = getattr(tool_call, "function", None)  # a custom tool's call has none
                if function is not None:
                    name, arguments = function.name, function.arguments
                    assembler.tool_call(choice.index, position, call_id=tool_call.id, name=name, arguments=arguments)
        return assembler.replies(usage)

    def _check_filtered(self, finish_reasons: dict[int, str | None], emitted: int) -> None:
        """A choice stopped by the content filter fails the call: its text is cut short."""
        filtered = sorted(index for index, reason in finish_reasons.items() if reason == "content_filter")
        if filtered:
            message = f"choice {filtered[0]} finished with finish_reason content_filter"
            raise self.translate(OpenAIPayloadError(message, code="content_filter"), emitted)


def _choice_count(params: dict[str, Any]) -> int:
    """The choices a request asks for (``n`` sent, the entry's default included)."""
    n = params.get("n")
    return n if isinstance(n, int) and n > 0 else 1
