"""TGI's wire format, as the fake server speaks it in the ``hf_api`` provider tests.

The Messages API (``/v1/chat/completions``): ``chat.completion`` JSON and
``chat.completion.chunk`` server-sent events (TGI 3 closes with a usage-only chunk when
``stream_options.include_usage`` is set), ending with ``data: [DONE]``. Errors:
``{"error": ..., "error_type": ...}``, also sent as an event inside a 200 stream.
"""

from __future__ import annotations

from typing import Any

from tests.support.fake_http import Reply

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
FINGERPRINT = "3.0.1-sha-bb9095a"
CREATED = 1732000000


def _answer(
    kind: str, choice: dict[str, Any], finish: str | None, usage: dict[str, int] | None, model: str
) -> dict[str, Any]:
    """A ``chat.completion`` or ``chat.completion.chunk`` with one choice (``delta`` or ``message``)."""
    return {
        "object": kind,
        "id": "",
        "created": CREATED,
        "model": model,
        "system_fingerprint": FINGERPRINT,
        "choices": [{"index": 0, **choice, "logprobs": None, "finish_reason": finish}],
        "usage": usage,
    }


def chunk(
    content: str | None, finish: str | None = None, usage: dict[str, int] | None = None, model: str = MODEL
) -> dict[str, Any]:
    """One ``chat.completion.chunk`` as TGI streams it."""
    return _answer("chat.completion.chunk", {"delta": {"role": "assistant", "content": content}}, finish, usage, model)


def usage_chunk(prompt: int, completion: int) -> dict[str, Any]:
    """TGI 3's closing chunk with ``stream_options.include_usage``: no choices, only usage."""
    event = chunk(None)
    event["choices"] = []
    event["usage"] = usage(prompt, completion)
    return event


def usage(prompt: int, completion: int) -> dict[str, int]:
    """A usage object."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion(content: str, finish: str = "eos_token", tokens: tuple[int, int] = (21, 3)) -> dict[str, Any]:
    """A ``chat.completion`` as TGI answers a non-streamed request."""
    message = {"message": {"role": "assistant", "content": content}}
    return _answer("chat.completion", message, finish, usage(*tokens), MODEL)


def tgi_error(message: str, error_type: str) -> dict[str, str]:
    """TGI's error body (and, inside a 200 stream, its error event)."""
    return {"error": message, "error_type": error_type}


def streamed(*contents: str, finish: str = "eos_token", **reply: Any) -> Reply:
    """A TGI stream of ``contents``, the last with ``finish``, then usage and ``[DONE]``."""
    events: list[Any] = [chunk(text) for text in contents[:-1]]
    events += [chunk(contents[-1], finish), usage_chunk(21, len(contents)), "[DONE]"]
    return Reply(events=events, chunked=True, **reply)


def tool_call_chunk(
    call_index: int,
    arguments: str,
    *,
    name: str | None = None,
    call_id: str = "",
    finish: str | None = None,
    index: int = 0,
    listed: bool = True,
) -> dict[str, Any]:
    """A ``chat.completion.chunk`` holding one tool-call fragment: TGI 3 sends a list of one
    fragment with ``id`` ``""`` and the name on the first (``listed``); older versions send the
    fragment as an object instead of a list. A router in front of another engine sends ids."""
    fragment = {
        "index": call_index,
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }
    delta = {"role": "assistant", "content": None, "tool_calls": [fragment] if listed else fragment}
    event = _answer("chat.completion.chunk", {"delta": delta}, finish, None, MODEL)
    event["choices"][0]["index"] = index
    return event


def tool_call_completion(*calls: tuple[str, dict[str, Any] | str], finish: str = "stop") -> dict[str, Any]:
    """A non-streamed ``chat.completion`` calling ``calls`` (name, arguments); TGI writes
    ``arguments`` as an object and ids as indexes."""
    tool_calls = [
        {"id": str(number), "type": "function", "function": {"name": name, "description": None, "arguments": arguments}}
        for number, (name, arguments) in enumerate(calls)
    ]
    message = {"message": {"role": "assistant", "content": None, "tool_calls": tool_calls}}
    return _answer("chat.completion", message, finish, usage(30, 12), MODEL)
