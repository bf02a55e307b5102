"""Shared conversions for the API providers: messages, generation kwargs, secrets, finish
reasons and usage."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from providers import errors
from tasks.contract.schemas import ChatMessage, ResponseFormat, ToolChoice, ToolDefinition, Usage

# Finish reasons normalised as Haystack does (TGI and HF report their own words).
FINISH_REASONS: dict[str, str] = {
    "stop": "stop",
    "eos_token": "stop",
    "stop_sequence": "stop",
    "end_turn": "stop",
    "completed": "stop",
    "length": "length",
    "max_tokens": "length",
    "max_output_tokens": "length",
    "content_filter": "content_filter",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
}


def to_chat_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Messages in the shape of the OpenAI and HF chat APIs (OpenAI's own: content parts, tool
    calls and tool results pass as they are)."""
    return [message.model_dump(mode="json", exclude_none=True) for message in messages]


def chat_tool_params(
    tools: Sequence[ToolDefinition] | None, tool_choice: ToolChoice | None, parallel_tool_calls: bool | None
) -> dict[str, Any]:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` in Chat Completions' shape (the
    request's own). Without tools neither of the others is sent: OpenAI refuses
    ``parallel_tool_calls`` without ``tools``, and a ``tool_choice`` of none is the default."""
    if not tools:
        return {}
    params: dict[str, Any] = {"tools": [tool.model_dump(mode="json", exclude_none=True) for tool in tools]}
    if tool_choice is not None:
        params["tool_choice"] = tool_choice if isinstance(tool_choice, str) else tool_choice.model_dump(mode="json")
    if parallel_tool_calls is not None:
        params["parallel_tool_calls"] = parallel_tool_calls
    return params


def response_format_param(response_format: ResponseFormat) -> dict[str, Any]:
    """``response_format`` in Chat Completions' shape (``json_schema.schema`` by its wire name)."""
    return response_format.model_dump(mode="json", exclude_none=True, by_alias=True)


# The names a request may give the cap on generated tokens (Cascade's, then each vendor's).
OUTPUT_LIMIT_KEYS = ("max_tokens", "max_new_tokens", "max_completion_tokens", "max_output_tokens")


def merge_generation_kwargs(
    defaults: dict[str, Any], request: dict[str, Any], *, max_output_tokens: int | None = None
) -> dict[str, Any]:
    """The provider's configured defaults overlaid by the request's own values, with the
    operator's cap on generated tokens winning over both.

    ``max_output_tokens`` (the provider entry's cap; None for none): an output limit above it,
    under any of its names (``OUTPUT_LIMIT_KEYS``, and ``min_new_tokens``), comes down to it,
    and a call that names none gets it as ``max_tokens``, so the cap holds either way. A
    request may ask for fewer tokens, never more.
    """
    merged = dict(defaults)
    merged.update({key: value for key, value in request.items() if value is not None})
    if max_output_tokens is None:
        return merged
    for key in (*OUTPUT_LIMIT_KEYS, "min_new_tokens"):
        value = merged.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > max_output_tokens:
            merged[key] = max_output_tokens
    if not any(merged.get(key) is not None for key in OUTPUT_LIMIT_KEYS):
        merged["max_tokens"] = max_output_tokens
    return merged


def normalise_finish_reason(reason: str | None) -> str | None:
    """``stop`` / ``length`` / ``content_filter`` / ``tool_calls`` from a vendor's word."""
    if reason is None:
        return None
    return FINISH_REASONS.get(reason, reason)


def usage_from(prompt_tokens: int | None, completion_tokens: int | None) -> Usage:
    """A ``Usage`` from counts that may be missing."""
    prompt, completion = prompt_tokens or 0, completion_tokens or 0
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def read_secret(provider_id: str, *env_names: str | None, required: bool = True) -> str | None:
    """The first non-empty value among the named env vars.

    Raises ``AuthenticationFailed`` naming the variable (never its value) when ``required``
    and none is set.
    """
    names = [name for name in env_names if name]
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    if required:
        raise errors.AuthenticationFailed(f"{provider_id}: no credential in env var {' / '.join(names) or '(none)'}")
    return None
