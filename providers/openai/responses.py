"""The ``openai_responses`` provider: the Responses API (reasoning summaries, text formats).

The conversation goes in as ``input`` message items, system messages included, in order.
``generation_kwargs`` map as: ``max_tokens`` -> ``max_output_tokens``; ``temperature``,
``top_p``; ``reasoning`` (a dict) or ``reasoning_effort`` / ``reasoning_summary`` ->
``reasoning={effort, summary}``; ``text`` (a dict), ``response_format`` (Chat Completions'
shape, converted) or ``verbosity`` -> ``text={format, verbosity}``. The Responses API has no
``stop``, ``seed`` or ``n``: those keys, the provider's ``stop_words`` included, are dropped.
Every call sends ``store=false``: Cascade keeps its own replies, and a conversation kept at
the vendor as well (the API's default) is a copy nobody asked for.

Streamed ``response.output_text.delta`` events go to ``on_chunk`` as the answer. Reasoning
summary deltas are never passed to ``on_chunk`` (subscribers would take them for the answer):
they are collected into the reply's ``meta["reasoning"]``; they still count as a sign of life
for ``first_chunk_timeout_s``. ``response.completed`` ends the stream with its usage,
``response.incomplete`` with ``finish_reason`` ``length`` (or a ``ContentFiltered`` failure),
``response.failed`` and ``error`` events with the translated error; a stream that ends with
none of them was cut. Without streaming, ``on_chunk`` is called once with the whole text.
"""

from __future__ import annotations

from typing import Any, cast

import openai
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseCreatedEvent,
    ResponseErrorEvent,
    ResponseFailedEvent,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    ResponseInputParam,
    ResponseReasoningSummaryTextDeltaEvent,
    ResponseRefusalDeltaEvent,
    ResponseStreamEvent,
    ResponseTextDeltaEvent,
)

from providers.base import OnChunk, ProviderCall, StreamingChunk, utc_now_iso
from providers.guard import CallGuard
from providers.messages import merge_generation_kwargs, normalise_finish_reason, usage_from
from providers.openai.common import Emitted, OpenAIFamilyProvider, output_limit, request_timeout
from providers.openai.errors import OpenAIPayloadError
from tasks.contract.schemas import AssistantReply, ChatMessage, ReplyMeta, Usage

_TERMINAL_EVENTS = (ResponseCompletedEvent, ResponseIncompleteEvent, ResponseFailedEvent)


def responses_input(messages: list[ChatMessage]) -> ResponseInputParam:
    """The conversation as Responses ``input`` message items (roles kept, order kept)."""
    return cast(ResponseInputParam, [{"role": message.role, "content": message.content} for message in messages])


def responses_generation_kwargs(merged: dict[str, Any]) -> dict[str, Any]:
    """Responses API parameters from Cascade's ``generation_kwargs``; see the module docstring."""
    params: dict[str, Any] = {"store": False}  # not a request's choice: see the module docstring
    params.update({key: merged[key] for key in ("temperature", "top_p") if merged.get(key) is not None})
    limit = output_limit(merged, "max_output_tokens")
    if limit is not None:
        params["max_output_tokens"] = limit
    reasoning = dict(merged.get("reasoning") or {})
    for source, key in (("reasoning_effort", "effort"), ("reasoning_summary", "summary")):
        if merged.get(source) is not None:
            reasoning.setdefault(key, merged[source])
    if reasoning:
        params["reasoning"] = reasoning
    text = dict(merged.get("text") or {})
    response_format = merged.get("response_format")
    if isinstance(response_format, dict) and "format" not in text:
        text["format"] = _text_format(response_format)
    if merged.get("verbosity") is not None:
        text.setdefault("verbosity", merged["verbosity"])
    if text:
        params["text"] = text
    return params


def _text_format(response_format: dict[str, Any]) -> dict[str, Any]:
    """Chat Completions' ``response_format`` in the Responses API's ``text.format`` shape."""
    schema = response_format.get("json_schema")
    if response_format.get("type") == "json_schema" and isinstance(schema, dict):
        return {"type": "json_schema", **schema}
    return dict(response_format)


class OpenAIResponsesProvider(OpenAIFamilyProvider):
    """``type = "openai_responses"``; see the module docstring."""

    def generate(
        self, client: openai.OpenAI, call: ProviderCall, guard: CallGuard, on_chunk: OnChunk
    ) -> list[AssistantReply]:
        """Send one Responses request (streamed or not) and build its reply."""
        merged = merge_generation_kwargs(
            self.config.generation_kwargs, call.generation_kwargs, max_output_tokens=self.config.max_output_tokens
        )
        params = responses_generation_kwargs(merged)
        items = responses_input(list(call.messages))
        timeout = request_timeout(guard)
        responses = client.responses
        if not call.stream:
            response = self.open(
                guard, call, lambda: responses.create(model=self.wire_model, input=items, timeout=timeout, **params)
            )
            reply = self._reply(response, response.output_text, _reasoning_of(response), utc_now_iso(), emitted=0)
            if reply.content:
                meta = {"model": reply.meta.model, "finish_reason": reply.meta.finish_reason}
                on_chunk(StreamingChunk(content=reply.content, meta=meta))
            return [reply]
        stream = self.open(
            guard,
            call,
            lambda: responses.create(model=self.wire_model, input=items, stream=True, timeout=timeout, **params),
        )
        with stream:  # closed at once on any exit, a cancel from on_chunk included
            return [self._from_stream(stream, call, guard, on_chunk)]

    def _from_stream(
        self, stream: openai.Stream[ResponseStreamEvent], call: ProviderCall, guard: CallGuard, on_chunk: OnChunk
    ) -> AssistantReply:
        parts: list[str] = []
        reasoning: dict[tuple[int, int], list[str]] = {}
        model = self.wire_model
        started_at: str | None = None
        emitted = Emitted()
        final: Response | None = None
        for event in self.events(guard, call, stream, emitted):
            if isinstance(event, ResponseTextDeltaEvent | ResponseRefusalDeltaEvent) and event.delta:
                guard.chunk_received()
                started_at = started_at or utc_now_iso()
                parts.append(event.delta)
                emitted.chunks += 1
                on_chunk(StreamingChunk(content=event.delta, meta={"model": model, "finish_reason": None}))
            elif isinstance(event, ResponseReasoningSummaryTextDeltaEvent):
                guard.chunk_received()
                reasoning.setdefault((event.output_index, event.summary_index), []).append(event.delta)
            elif isinstance(event, ResponseCreatedEvent | ResponseInProgressEvent):
                model = event.response.model or model
            elif isinstance(event, ResponseErrorEvent):
                raise self.translate(OpenAIPayloadError(event.message, code=event.code), emitted.chunks)
            elif isinstance(event, _TERMINAL_EVENTS):
                final = event.response
                break
        if final is None:
            raise self.ended_early(emitted.chunks)
        summary = "\n\n".join("".join(reasoning[key]) for key in sorted(reasoning)) or _reasoning_of(final)
        return self._reply(final, "".join(parts) or final.output_text, summary, started_at, emitted.chunks)

    def _reply(
        self, response: Response, text: str, reasoning: str, started_at: str | None, emitted: int
    ) -> AssistantReply:
        """The reply of a finished ``response``, or the error it ended with."""
        if response.status == "failed" or response.error is not None:
            error = response.error
            message = error.message if error is not None else "the response failed"
            raise self.translate(OpenAIPayloadError(message, code=error.code if error else None), emitted)
        finish_reason = "stop"
        if response.status == "incomplete":
            reason = response.incomplete_details.reason if response.incomplete_details else None
            if reason == "content_filter":
                message = "the response is incomplete: content_filter"
                raise self.translate(OpenAIPayloadError(message, code="content_filter"), emitted)
            finish_reason = normalise_finish_reason(reason) or "length"
        usage = Usage()
        if response.usage is not None:
            usage = usage_from(response.usage.input_tokens, response.usage.output_tokens)
        extra: dict[str, Any] = {"reasoning": reasoning} if reasoning else {}
        meta = ReplyMeta(
            model=response.model or self.wire_model,
            index=0,
            finish_reason=finish_reason,
            usage=usage,
            completion_start_time=started_at or utc_now_iso(),
            **extra,
        )
        return AssistantReply(content=text, meta=meta)


def _reasoning_of(response: Response) -> str:
    """The reasoning summary texts of a finished response, joined."""
    texts = [
        summary.text
        for item in response.output or []
        if item.type == "reasoning"
        for summary in item.summary or []
        if summary.text
    ]
    return "\n\n".join(texts)
