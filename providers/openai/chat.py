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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import openai
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageParam

from providers.base import OnChunk, ProviderCall, StreamingChunk, utc_now_iso
from providers.guard import CallGuard
from providers.messages import merge_generation_kwargs, normalise_finish_reason, to_chat_messages, usage_from
from providers.openai.common import Emitted, OpenAIFamilyProvider, chat_generation_kwargs, request_timeout
from providers.openai.errors import OpenAIPayloadError
from tasks.contract.schemas import AssistantReply, ReplyMeta, Usage


@dataclass
class _Choice:
    """One choice as its deltas arrive."""

    parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    started_at: str | None = None


class OpenAIChatProvider(OpenAIFamilyProvider):
    """``type = "openai"``; see the module docstring."""

    def generate(
        self, client: openai.OpenAI, call: ProviderCall, guard: CallGuard, on_chunk: OnChunk
    ) -> list[AssistantReply]:
        """Send one Chat Completions request (streamed or not) and collect its replies."""
        merged = merge_generation_kwargs(
            self.config.generation_kwargs, call.generation_kwargs, max_output_tokens=self.config.max_output_tokens
        )
        params = chat_generation_kwargs(merged, self.config.stop_words, self.max_tokens_key)
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

    def _from_stream(
        self,
        stream: openai.Stream[ChatCompletionChunk],
        call: ProviderCall,
        guard: CallGuard,
        on_chunk: OnChunk,
        expected: int,
    ) -> list[AssistantReply]:
        choices: dict[int, _Choice] = {}
        model = self.wire_model
        usage = Usage()
        emitted = Emitted()
        for chunk in self.events(guard, call, stream, emitted):
            model = chunk.model or model  # Azure's prompt-filter chunk has an empty model
            if chunk.usage is not None:
                usage = usage_from(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
            for delta in chunk.choices or []:
                choice = choices.setdefault(delta.index, _Choice())
                choice.finish_reason = delta.finish_reason or choice.finish_reason
                text = (delta.delta.content or delta.delta.refusal) if delta.delta is not None else None
                if not text:
                    continue
                guard.chunk_received()
                choice.started_at = choice.started_at or utc_now_iso()
                choice.parts.append(text)
                emitted.chunks += 1
                meta = {"model": model, "finish_reason": normalise_finish_reason(choice.finish_reason)}
                on_chunk(StreamingChunk(content=text, index=delta.index, meta=meta))
        if not all(index in choices and choices[index].finish_reason for index in range(expected)):
            raise self.ended_early(emitted.chunks)
        finish_reasons = {index: choice.finish_reason for index, choice in choices.items()}
        self._check_filtered(finish_reasons, emitted.chunks)
        return [
            _reply("".join(choice.parts), model, index, choice.finish_reason, usage, choice.started_at)
            for index, choice in sorted(choices.items())
        ]

    def _from_completion(self, completion: ChatCompletion, on_chunk: OnChunk) -> list[AssistantReply]:
        if not completion.choices:
            raise self.translate(OpenAIPayloadError("the answer held no choices"), emitted=0)
        self._check_filtered({choice.index: choice.finish_reason for choice in completion.choices}, emitted=0)
        model = completion.model or self.wire_model
        usage = Usage()
        if completion.usage is not None:
            usage = usage_from(completion.usage.prompt_tokens, completion.usage.completion_tokens)
        arrived_at = utc_now_iso()
        replies = []
        for choice in sorted(completion.choices, key=lambda choice: choice.index):
            text = choice.message.content or choice.message.refusal or ""
            replies.append(_reply(text, model, choice.index, choice.finish_reason, usage, arrived_at))
            if text:
                meta = {"model": model, "finish_reason": normalise_finish_reason(choice.finish_reason)}
                on_chunk(StreamingChunk(content=text, index=choice.index, meta=meta))
        return replies

    def _check_filtered(self, finish_reasons: dict[int, str | None], emitted: int) -> None:
        """A choice stopped by the content filter fails the call: its text is cut short."""
        filtered = sorted(index for index, reason in finish_reasons.items() if reason == "content_filter")
        if filtered:
            message = f"choice {filtered[0]} finished with finish_reason content_filter"
            raise self.translate(OpenAIPayloadError(message, code="content_filter"), emitted)


def _choice_count(params: dict[str, Any]) -> int:
    n = params.get("n")
    return n if isinstance(n, int) and n > 0 else 1


def _reply(
    text: str, model: str, index: int, finish_reason: str | None, usage: Usage, started_at: str | None
) -> AssistantReply:
    # Usage is the request's, all choices together: the API does not split it per choice.
    meta = ReplyMeta(
        model=model,
        index=index,
        finish_reason=normalise_finish_reason(finish_reason),
        usage=usage,
        completion_start_time=started_at or utc_now_iso(),
    )
    return AssistantReply(content=text, meta=meta)
