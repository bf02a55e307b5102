"""Replies assembled from what a provider streams: text and tool-call fragments, per choice.

Every API provider reads its vendor's stream into a ``ReplyAssembler``: each piece of text and
each fragment of a tool call goes to ``on_chunk`` at once (under its choice's ``index``), and is
kept, so that the finished replies hold the whole text and the whole calls. A call's first
fragment carries its ``id`` and ``name``; a vendor that sends no id gets a fresh ``call_...``
one, since a tool message must be able to name the call it answers.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from providers.base import OnChunk, StreamingChunk, utc_now_iso
from providers.messages import normalise_finish_reason
from tasks.contract.schemas import AssistantReply, FunctionCall, ReplyMeta, ToolCall, ToolCallDelta, Usage


def new_call_id() -> str:
    """A tool call id for a call whose provider gave none."""
    return f"call_{secrets.token_hex(12)}"


@dataclass
class _Call:
    id: str
    name: str = ""
    arguments: list[str] = field(default_factory=list)


@dataclass
class _Choice:
    parts: list[str] = field(default_factory=list)
    calls: dict[int, _Call] = field(default_factory=dict)
    finish_reason: str | None = None
    started_at: str | None = None
    usage: Usage | None = None


class ReplyAssembler:
    """The choices of one call as their pieces arrive; ``emitted`` counts the chunks sent on."""

    def __init__(self, on_chunk: OnChunk, model: str) -> None:
        self._on_chunk = on_chunk
        self.model = model
        self.emitted = 0
        self._choices: dict[int, _Choice] = {}

    def choice(self, index: int) -> None:
        """Note that choice ``index`` exists (it may end up empty)."""
        self._choices.setdefault(index, _Choice())

    def text(self, index: int, text: str) -> None:
        """A piece of choice ``index``'s text (empty pieces are ignored)."""
        if not text:
            return
        choice = self._started(index)
        choice.parts.append(text)
        self._emit(StreamingChunk(content=text, index=index, meta=self._meta(choice)))

    def tool_call(
        self, index: int, call_index: int, *, call_id: str | None, name: str | None, arguments: str | None
    ) -> None:
        """A fragment of call ``call_index`` of choice ``index``; ``call_id`` and ``name`` are
        read only from a call's first fragment (later ones may repeat or omit them)."""
        choice = self._started(index)
        call = choice.calls.get(call_index)
        first = call is None
        if call is None:
            call = choice.calls[call_index] = _Call(id=call_id or new_call_id(), name=name or "")
        elif name and not call.name:
            call.name = name
        if arguments:
            call.arguments.append(arguments)
        if not first and not arguments:
            return  # a fragment with nothing new for a subscriber
        delta = ToolCallDelta(
            index=call_index,
            id=call.id if first else None,
            name=(call.name or None) if first else None,
            arguments_delta=arguments or "",
        )
        self._emit(StreamingChunk(content="", index=index, meta=self._meta(choice), tool_call=delta))

    def finish(self, index: int, reason: str | None) -> None:
        """Choice ``index`` ended with ``reason`` (the vendor's word; normalised)."""
        if reason:
            self._choices.setdefault(index, _Choice()).finish_reason = normalise_finish_reason(reason)

    def usage(self, index: int, usage: Usage) -> None:
        """The usage of choice ``index`` alone, where the provider reports it per reply."""
        self._choices.setdefault(index, _Choice()).usage = usage

    def finish_reason(self, index: int) -> str | None:
        """The finish reason of choice ``index`` so far."""
        choice = self._choices.get(index)
        return choice.finish_reason if choice else None

    @property
    def indexes(self) -> list[int]:
        """The choices seen so far, in order."""
        return sorted(self._choices)

    def has_tool_calls(self, index: int) -> bool:
        """True once choice ``index`` has a call."""
        choice = self._choices.get(index)
        return bool(choice and choice.calls)

    def replies(self, usage: Usage | None = None) -> list[AssistantReply]:
        """The finished replies, by index. ``usage`` (the whole call's, as most APIs report it)
        goes to each reply that has none of its own."""
        replies = []
        for index, choice in sorted(self._choices.items()):
            calls = [
                ToolCall(id=call.id, function=FunctionCall(name=call.name, arguments="".join(call.arguments)))
                for _, call in sorted(choice.calls.items())
            ]
            text = "".join(choice.parts)
            finish_reason = choice.finish_reason
            if calls and finish_reason in (None, "stop"):
                finish_reason = "tool_calls"  # some servers say "stop" although the model called tools
            meta = ReplyMeta(
                model=self.model,
                index=index,
                finish_reason=finish_reason,
                usage=choice.usage or usage or Usage(),
                completion_start_time=choice.started_at or utc_now_iso(),
            )
            replies.append(AssistantReply(content=text or (None if calls else ""), tool_calls=calls or None, meta=meta))
        return replies

    def _started(self, index: int) -> _Choice:
        choice = self._choices.setdefault(index, _Choice())
        choice.started_at = choice.started_at or utc_now_iso()
        return choice

    def _meta(self, choice: _Choice) -> dict[str, str | None]:
        return {"model": self.model, "finish_reason": choice.finish_reason}

    def _emit(self, chunk: StreamingChunk) -> None:
        self.emitted += 1
        self._on_chunk(chunk)
