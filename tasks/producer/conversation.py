"""Helpers for a producer's side of an agent loop and of image inputs.

The contract is OpenAI Chat Completions' message shape, so a loop is: send the conversation,
append the reply's assistant message as it is (minus its ``meta``), run the tools it calls,
append one ``tool`` message per call with the result, and send again. Everything here builds
plain JSON-ready dicts, so the same conversation can be sent by this client or by any other::

    messages = [{"role": "user", "content": "Weather in Paris?"}]
    reply = client.wait(client.submit(messages=messages, tools=TOOLS))
    while calls := tool_calls_of(reply):
        messages = with_reply(messages, reply)
        messages = with_tool_results(messages, {call.id: run_tool(call) for call in calls})
        reply = client.wait(client.submit(messages=messages, tools=TOOLS))
"""

from __future__ import annotations

import base64
import mimetypes
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tasks.contract.messages import IMAGE_MIME_TYPES
from tasks.contract.schemas import ChatReply, ToolCall


def tool_calls_of(reply: ChatReply, choice: int = 0) -> list[ToolCall]:
    """The tool calls the reply's ``choice`` asks for (empty when it answered in text)."""
    if choice >= len(reply.replies):
        return []
    return list(reply.replies[choice].tool_calls or [])


def with_reply(messages: Sequence[Mapping[str, Any]], reply: ChatReply, choice: int = 0) -> list[dict[str, Any]]:
    """``messages`` plus the assistant message of the reply's ``choice``, as the next request
    takes it."""
    if choice >= len(reply.replies):
        raise ValueError(f"the reply has no choice {choice} (status {reply.status})")
    message = reply.replies[choice].to_message().model_dump(mode="json", exclude_none=True)
    return [dict(m) for m in messages] + [message]


def with_tool_results(messages: Sequence[Mapping[str, Any]], results: Mapping[str, str]) -> list[dict[str, Any]]:
    """``messages`` plus one ``tool`` message per ``tool_call_id -> result text``."""
    return [dict(m) for m in messages] + [
        {"role": "tool", "tool_call_id": call_id, "content": content} for call_id, content in results.items()
    ]


def image_part(data: bytes, mime_type: str, detail: str | None = None) -> dict[str, Any]:
    """A user-message content part holding ``data`` as a ``data:`` URL."""
    if mime_type not in IMAGE_MIME_TYPES:
        raise ValueError(f"{mime_type!r} is not one of {', '.join(IMAGE_MIME_TYPES)}")
    image_url: dict[str, Any] = {"url": f"data:{mime_type};base64,{base64.b64encode(data).decode()}"}
    if detail is not None:
        image_url["detail"] = detail
    return {"type": "image_url", "image_url": image_url}


def image_file_part(path: str | Path, detail: str | None = None) -> dict[str, Any]:
    """A content part for the image file at ``path`` (its type guessed from the file name)."""
    mime_type, _encoding = mimetypes.guess_type(str(path))
    if mime_type is None:
        raise ValueError(f"cannot tell the image type of {path}")
    return image_part(Path(path).read_bytes(), mime_type, detail)


def user_message(text: str, images: Sequence[str | Path] = ()) -> dict[str, Any]:
    """A user message: plain text, or text plus image files as content parts."""
    if not images:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "text", "text": text}, *(image_file_part(p) for p in images)]}
