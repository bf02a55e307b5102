"""The ``openai_responses`` provider: the Responses API (reasoning summaries, text formats).

The conversation goes in as ``input`` items, in order: messages (system ones included; a user
message's parts as ``input_text`` / ``input_image``), an assistant's ``tool_calls`` as
``function_call`` items and each ``tool`` message as a ``function_call_output`` item, both
under the call's ``call_id``. The request's tools go as function tools
(``{type: "function", name, description, parameters, strict}``, ``strict`` false unless the
request says otherwise, as in Chat Completions), ``tool_choice`` in the API's shape
(``{type: "function", name}`` for a named one), ``parallel_tool_calls`` as it is.
``generation_kwargs`` map as: ``max_tokens`` -> ``max_output_tokens``; ``temperature``,
``top_p``; ``reasoning`` (a dict) or ``reasoning_effort`` / ``reasoning_summary`` ->
``reasoning={effort, summary}``; ``text`` (a dict), ``response_format`` (Chat Completions'
shape, converted: ``json_schema`` becomes ``text.format`` ``{type: "json_schema", name, schema,
strict}``) or ``verbosity`` -> ``text={format, verbosity}``. The Responses API has no ``stop``
or ``seed``: those keys, the provider's ``stop_words`` included, are dropped. It has no ``n``
either: a call for several choices is ``Unsupported`` (the type's capabilities say so, so the
chain skips it first).
Every call sends ``store=false``: Cascade keeps its own replies, and a conversation kept at
the vendor as well (the API's default) is a copy nobody asked for.

Streamed ``response.output_text.delta`` events go to ``on_chunk`` as the answer; a function
call's ``response.output_item.added`` opens a tool call (its ``call_id`` and name) and its
``response.function_call_arguments.delta`` events are the call's fragments; a reply that calls
tools has finish_reason ``tool_calls``. Reasoning
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
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseFunctionToolCall,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    ResponseInputParam,
    ResponseOutputItemAddedEvent,
    ResponseReasoningSummaryTextDeltaEvent,
    ResponseRefusalDeltaEvent,
    ResponseStreamEvent,
    ResponseTextDeltaEvent,
)

from providers import errors
from providers.base import OnChunk, ProviderCall
from providers.guard import CallGuard
from providers.messages import merge_generation_kwargs, normalise_finish_reason, response_format_param, usage_from
from providers.openai.common import Emitted, OpenAIFamilyProvider, output_limit, request_timeout
from providers.openai.errors import OpenAIPayloadError
from providers.replies import ReplyAssembler
from tasks.contract.schemas import AssistantReply, ChatMessage, ImagePart, Usage

_TERMINAL_EVENTS = (ResponseCompletedEvent, ResponseIncompleteEvent, ResponseFailedEvent)


def responses_input(messages: list[ChatMessage]) -> ResponseInputParam:
    """The conversation as Responses ``input`` items (see the module docstring)."""
    items: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "tool":
            items.append({"type": "function_call_output", "call_id": message.tool_call_id, "output": message.text()})
            continue
        if message.role == "user" and isinstance(message.content, list):
            parts = [
                {"type": "input_image", "image_url": part.image_url.url, "detail": part.image_url.detail or "auto"}
                if isinstance(part, ImagePart)
                else {"type": "input_text", "text": part.text}
                for part in message.content
            ]
            items.append({"role": "user", "content": parts})
        elif message.content is not None:
            items.append({"role": message.role, "content": message.text()})
        for call in message.tool_calls or []:
            function = call.function
            items.append(
                {"type": "function_call", "call_id": call.id, "name": function.name, "arguments": function.arguments}
            )
    return cast(ResponseInputParam, items)


def responses_tool_params(call: ProviderCall) -> dict[str, Any]:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` in the Responses API's shape."""
    if not call.tools:
        return {}
    tools = []
    for tool in call.tools:
        function = tool.function
        entry: dict[str, Any] = {
            "type": "function",
            "name": function.name,
            "parameters": function.parameters,
            "strict": bool(function.strict),
        }
        if function.description is not None:
            entry["description"] = function.description
        tools.append(entry)
    params: dict[str, Any] = {"tools": tools}
    choice = call.tool_choice
    if choice is not None:
        params["tool_choice"] = (
            choice if isinstance(choice, str) else {"type": "function", "name": choice.function.name}
        )
    if call.parallel_tool_calls is not None:
        params["parallel_tool_calls"] = call.parallel_tool_calls
    return params


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
        if call.choices > 1:
            raise errors.Unsupported(f"{self.provider_id}: the Responses API answers one choice, not {call.choices}")
        merged = merge_generation_kwargs(
            self.config.generation_kwargs, call.generation_kwargs, max_output_tokens=self.config.max_output_tokens
        )
        if call.response_format is not None:
            merged["response_format"] = response_format_param(call.response_format)
        params = {**responses_generation_kwargs(merged), **responses_tool_params(call)}
        items = responses_input(list(call.messages))
        timeout = request_timeout(guard)
        responses = client.responses
        assembler = ReplyAssembler(on_chunk, self.wire_model)
        if not call.stream:
            response = self.open(
                guard, call, lambda: responses.create(model=self.wire_model, input=items, timeout=timeout, **params)
            )
            self._check_finished(response, emitted=0)
            assembler.text(0, response.output_text)
            self._add_calls(assembler, response, streamed=set())
            return [self._reply(response, assembler, _reasoning_of(response))]
        stream = self.open(
            guard,
            call,
            lambda: responses.create(model=self.wire_model, input=items, stream=True, timeout=timeout, **params),
        )
        with stream:  # closed at once on any exit, a cancel from on_chunk included
            return [self._from_stream(stream, call, guard, assembler)]

    def _from_stream(
        self,
        stream: openai.Stream[ResponseStreamEvent],
        call: ProviderCall,
        guard: CallGuard,
        assembler: ReplyAssembler,
    ) -> AssistantReply:
        reasoning: dict[tuple[int, int], list[str]] = {}
        emitted = Emitted()
        calls: dict[int, int] = {}  # output_index -> the call's position among the reply's calls
        final: Response | None = None
        for event in self.events(guard, call, stream, emitted):
            if isinstance(event, ResponseTextDeltaEvent | ResponseRefusalDeltaEvent) and event.delta:
                guard.chunk_received()
                assembler.text(0, event.delta)
            elif isinstance(event, ResponseOutputItemAddedEvent) and isinstance(event.item, ResponseFunctionToolCall):
                guard.chunk_received()
                position = calls.setdefault(event.output_index, len(calls))
                item = event.item
                assembler.tool_call(0, position, call_id=item.call_id, name=item.name, arguments=item.arguments)
            elif isinstance(event, ResponseFunctionCallArgumentsDeltaEvent) and event.output_index in calls:
                guard.chunk_received()
                position = calls[event.output_index]
                assembler.tool_call(0, position, call_id=None, name=None, arguments=event.delta)
            elif isinstance(event, ResponseReasoningSummaryTextDeltaEvent):
                guard.chunk_received()
                reasoning.setdefault((event.output_index, event.summary_index), []).append(event.delta)
            elif isinstance(event, ResponseCreatedEvent | ResponseInProgressEvent):
                assembler.model = event.response.model or assembler.model
            elif isinstance(event, ResponseErrorEvent):
                raise self.translate(OpenAIPayloadError(event.message, code=event.code), assembler.emitted)
            elif isinstance(event, _TERMINAL_EVENTS):
                final = event.response
                break
            emitted.chunks = assembler.emitted
        if final is None:
            raise self.ended_early(assembler.emitted)
        self._check_finished(final, assembler.emitted)
        if not assembler.indexes:  # nothing streamed: the final response holds the whole answer
            assembler.text(0, final.output_text)
        self._add_calls(assembler, final, streamed=set(calls))
        summary = "\n\n".join("".join(reasoning[key]) for key in sorted(reasoning)) or _reasoning_of(final)
        return self._reply(final, assembler, summary)

    @staticmethod
    def _add_calls(assembler: ReplyAssembler, response: Response, streamed: set[int]) -> None:
        """The function calls of a finished ``response`` that were not streamed, whole."""
        position = len(streamed)
        for output_index, item in enumerate(response.output or []):
            if isinstance(item, ResponseFunctionToolCall) and output_index not in streamed:
                assembler.tool_call(0, position, call_id=item.call_id, name=item.name, arguments=item.arguments)
                position += 1

    def _check_finished(self, response: Response, emitted: int) -> None:
        """Raise the error a finished ``response`` ended with, if any."""
        if response.status == "failed" or response.error is not None:
            error = response.error
            message = error.message if error is not None else "the response failed"
            raise self.translate(OpenAIPayloadError(message, code=error.code if error else None), emitted)
        if response.status == "incomplete":
            reason = response.incomplete_details.reason if response.incomplete_details else None
            if reason == "content_filter":
                message = "the response is incomplete: content_filter"
                raise self.translate(OpenAIPayloadError(message, code="content_filter"), emitted)

    def _reply(self, response: Response, assembler: ReplyAssembler, reasoning: str) -> AssistantReply:
        """The reply of a finished ``response`` (checked by ``_check_finished``)."""
        finish_reason = "stop"
        if response.status == "incomplete":
            reason = response.incomplete_details.reason if response.incomplete_details else None
            finish_reason = normalise_finish_reason(reason) or "length"
        assembler.model = response.model or assembler.model
        assembler.choice(0)
        assembler.finish(0, finish_reason)
        usage = Usage()
        if response.usage is not None:
            usage = usage_from(response.usage.input_tokens, response.usage.output_tokens)
        (reply,) = assembler.replies(usage)
        if reasoning:
            reply.meta.reasoning = reasoning  # type: ignore[attr-defined]  # ReplyMeta takes extra keys
        return reply


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
