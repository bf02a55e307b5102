"""The OpenAI wire formats the fake server speaks in the OpenAI-family provider tests.

Chat Completions: ``chat.completion`` JSON and ``chat.completion.chunk`` server-sent events
(the last one usage-only with empty ``choices`` when ``stream_options.include_usage`` is set),
ending with ``data: [DONE]``. Responses API: typed events, each sent with its ``event:`` name
and a ``sequence_number``. Errors: ``{"error": {message, type, param, code}}``.
"""

from __future__ import annotations

import traceback
from typing import Any

import pytest

from tests.support.fake_http import FakeHTTPServer, Reply

API_KEY = "sk-test-DoNotLeak-0123456789abcdef"
MODEL = "gpt-4.1-mini-2025-04-14"
CREATED = 1_732_000_000


def aim_openai_at(server: FakeHTTPServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Have the SDK take ``server`` for OpenAI: ``OPENAI_BASE_URL`` and ``OPENAI_API_KEY`` set."""
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", f"{server.url}/v1")


def header(received_headers: dict[str, str], name: str) -> str | None:
    """A request header, whatever its case on the wire."""
    return next((value for key, value in received_headers.items() if key.lower() == name.lower()), None)


def assert_no_secret(exc: BaseException, *secrets: str) -> None:
    """``exc`` (its str, repr and printed traceback) holds none of ``secrets``."""
    printed = "".join(traceback.format_exception(exc))
    for secret in secrets:
        for text in (str(exc), repr(exc), printed):
            assert secret not in text


def error_reply(status: int, message: str, type_: str | None = None, code: str | None = None, **headers: str) -> Reply:
    """An OpenAI-style error answer."""
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return Reply(status=status, json_body=body, headers=headers)


# --- Chat Completions ------------------------------------------------------------------------


def chat_chunk(
    content: str | None = None,
    finish_reason: str | None = None,
    index: int = 0,
    role: str | None = None,
    model: str = MODEL,
) -> dict[str, Any]:
    """One ``chat.completion.chunk`` with one choice."""
    delta: dict[str, Any] = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return {
        "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": model,
        "system_fingerprint": "fp_44709d6fcb",
        "service_tier": "default",
        "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        "usage": None,
    }


def tool_call_chunk(
    call_index: int,
    arguments: str,
    *,
    call_id: str | None = None,
    name: str | None = None,
    index: int = 0,
    model: str = MODEL,
) -> dict[str, Any]:
    """A ``chat.completion.chunk`` holding one fragment of a tool call, as OpenAI streams it:
    the call's first fragment has its ``id``, ``type`` and ``function.name`` (and arguments
    ``""``), the next ones only ``index`` and a piece of ``function.arguments``."""
    fragment: dict[str, Any] = {"index": call_index, "function": {"arguments": arguments}}
    if call_id is not None:
        fragment.update(id=call_id, type="function")
        fragment["function"]["name"] = name
    chunk = chat_chunk(index=index, model=model)
    delta = chunk["choices"][0]["delta"]
    if call_id is not None and call_index == 0:
        delta.update(role="assistant", content=None, refusal=None)
    delta["tool_calls"] = [fragment]
    return chunk


def tool_call_stream(*calls: tuple[str, str, list[str]], index: int = 0) -> list[dict[str, Any]]:
    """The chunks of one choice calling ``calls`` (id, name, argument fragments) one after the
    other, ending with finish_reason ``tool_calls`` (no usage chunk, no ``[DONE]``)."""
    chunks: list[dict[str, Any]] = []
    for call_index, (call_id, name, fragments) in enumerate(calls):
        chunks.append(tool_call_chunk(call_index, "", call_id=call_id, name=name, index=index))
        chunks += [tool_call_chunk(call_index, fragment, index=index) for fragment in fragments]
    chunks.append(chat_chunk(index=index, finish_reason="tool_calls"))
    return chunks


def usage_chunk(prompt_tokens: int, completion_tokens: int, model: str = MODEL) -> dict[str, Any]:
    """The last chunk when ``include_usage`` is set: empty ``choices``, the request's usage."""
    chunk = chat_chunk(model=model)
    chunk["choices"] = []
    chunk["usage"] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    return chunk


def chat_stream(*pieces: str, finish_reason: str = "stop", usage: tuple[int, int] = (12, 3)) -> list[Any]:
    """A whole streamed answer: role chunk, content chunks, finish chunk, usage chunk, [DONE]."""
    return [
        chat_chunk("", role="assistant"),
        *(chat_chunk(piece) for piece in pieces),
        chat_chunk(finish_reason=finish_reason),
        usage_chunk(*usage),
        "[DONE]",
    ]


def chat_completion(*texts: str, finish_reason: str = "stop", model: str = MODEL) -> dict[str, Any]:
    """A non-streamed ``chat.completion`` with one choice per text."""
    return {
        "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
        "object": "chat.completion",
        "created": CREATED,
        "model": model,
        "system_fingerprint": "fp_44709d6fcb",
        "choices": [
            {
                "index": index,
                "message": {"role": "assistant", "content": text, "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
            for index, text in enumerate(texts)
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
    }


def chat_completion_calling(*calls: tuple[str, str, str], content: str | None = None) -> dict[str, Any]:
    """A non-streamed ``chat.completion`` whose one choice calls ``calls`` (id, name, arguments)."""
    completion = chat_completion("", finish_reason="tool_calls")
    message = completion["choices"][0]["message"]
    message["content"] = content
    message["tool_calls"] = [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
        for call_id, name, arguments in calls
    ]
    return completion


# --- Responses API ---------------------------------------------------------------------------


def response_object(
    status: str = "completed",
    text: str | None = None,
    reasoning: list[str] | None = None,
    model: str = "o4-mini-2025-04-16",
    error: dict[str, Any] | None = None,
    incomplete_reason: str | None = None,
    usage: tuple[int, int] | None = (20, 7),
    function_calls: list[tuple[str, str, str]] | None = None,
) -> dict[str, Any]:
    """A ``response`` object as the Responses API returns (or embeds in its events);
    ``function_calls`` (call_id, name, arguments) are ``function_call`` items after the others."""
    output: list[dict[str, Any]] = []
    if reasoning is not None:
        summary = [{"type": "summary_text", "text": part} for part in reasoning]
        output.append({"id": "rs_1", "type": "reasoning", "summary": summary})
    if text is not None:
        content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        output.append(
            {"id": "msg_1", "type": "message", "status": "completed", "role": "assistant", "content": content}
        )
    for number, (call_id, name, arguments) in enumerate(function_calls or []):
        output.append(function_call_item(call_id, name, arguments, item_id=f"fc_{number}"))
    return {
        "id": "resp_67ccd2bed1ec8190b14f964abc054267",
        "object": "response",
        "created_at": CREATED,
        "status": status,
        "error": error,
        "incomplete_details": {"reason": incomplete_reason} if incomplete_reason else None,
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": None
        if usage is None
        else {
            "input_tokens": usage[0],
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage[1],
            "output_tokens_details": {"reasoning_tokens": 4},
            "total_tokens": usage[0] + usage[1],
        },
    }


def text_delta(delta: str) -> dict[str, Any]:
    """A ``response.output_text.delta`` event (sequence number set by ``responses_stream``)."""
    return {
        "type": "response.output_text.delta",
        "item_id": "msg_1",
        "output_index": 1,
        "content_index": 0,
        "delta": delta,
        "logprobs": [],
    }


def summary_delta(delta: str, summary_index: int = 0) -> dict[str, Any]:
    """A ``response.reasoning_summary_text.delta`` event."""
    return {
        "type": "response.reasoning_summary_text.delta",
        "item_id": "rs_1",
        "output_index": 0,
        "summary_index": summary_index,
        "delta": delta,
    }


def function_call_item(
    call_id: str, name: str, arguments: str, *, item_id: str = "fc_0", status: str = "completed"
) -> dict[str, Any]:
    """A ``function_call`` output item: ``id`` is the item's, ``call_id`` the one a
    ``function_call_output`` answers."""
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def function_call_events(
    call_id: str, name: str, fragments: list[str], *, output_index: int, item_id: str
) -> list[dict[str, Any]]:
    """How the API streams one function call: ``response.output_item.added`` (empty arguments),
    ``response.function_call_arguments.delta`` per fragment, then ``...arguments.done`` and
    ``response.output_item.done`` with the whole call."""
    arguments = "".join(fragments)
    added = function_call_item(call_id, name, "", item_id=item_id, status="in_progress")
    done = function_call_item(call_id, name, arguments, item_id=item_id)
    return [
        {"type": "response.output_item.added", "output_index": output_index, "item": added},
        *(
            {
                "type": "response.function_call_arguments.delta",
                "item_id": item_id,
                "output_index": output_index,
                "delta": piece,
            }
            for piece in fragments
        ),
        {
            "type": "response.function_call_arguments.done",
            "item_id": item_id,
            "output_index": output_index,
            "arguments": arguments,
        },
        {"type": "response.output_item.done", "output_index": output_index, "item": done},
    ]


def lifecycle(kind: str, response: dict[str, Any]) -> dict[str, Any]:
    """A ``response.created`` / ``in_progress`` / ``completed`` / ``failed`` / ``incomplete`` event."""
    return {"type": kind, "response": response}


def responses_stream(*events: dict[str, Any], cut_after: int | None = None, **reply: Any) -> Reply:
    """A Responses SSE answer: each event numbered and sent with its ``event:`` name."""
    numbered = [{**event, "sequence_number": number} for number, event in enumerate(events)]
    names: list[str | None] = [event["type"] for event in numbered]
    return Reply(events=list(numbered), event_names=names, cut_after=cut_after, **reply)


def responses_answer(*pieces: str, reasoning: list[str] | None = None) -> Reply:
    """A whole streamed Responses answer: created, reasoning summary, text deltas, completed."""
    started = response_object(status="in_progress", usage=None)
    summary = [summary_delta(part, index) for index, part in enumerate(reasoning or [])]
    final = response_object(text="".join(pieces), reasoning=reasoning)
    return responses_stream(
        lifecycle("response.created", started),
        lifecycle("response.in_progress", started),
        *summary,
        *(text_delta(piece) for piece in pieces),
        lifecycle("response.completed", final),
    )
