"""The stream contract every suite checks a request's events against (DESIGN's event stream):
``seq`` from 0 without a gap, one request id, one ``start`` and it is first, exactly one terminal
event and it is last, chunk attempt numbers that never go back, each chunk one choice's text or
one tool call's fragment with a call's ``id`` and ``name`` on its first fragment, and — given
the stored reply — a terminal event that carries it and kept chunks that spell each reply's
text and tool calls, choice by choice.

``contract_breach`` says what is wrong (or None); ``assert_well_formed`` and ``assert_coherent``
are its assert forms; ``reconstruct_text`` and ``reconstruct_tool_calls`` are what a subscriber
shows of a choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tasks.contract.schemas import ChatReply, StreamEvent


@dataclass(frozen=True)
class StreamedCall:
    """A tool call as a subscriber rebuilds it from its fragments."""

    id: str | None
    name: str | None
    arguments: str


def kept_chunks(events: Sequence[StreamEvent], index: int = 0) -> list[StreamEvent]:
    """The chunk events of choice ``index`` whose attempt no ``fallback`` event voided."""
    voided = {e.attempt for e in events if e.type == "fallback"}
    return [e for e in events if e.type == "chunk" and e.attempt not in voided and (e.index or 0) == index]


def reconstruct_text(events: Sequence[StreamEvent], index: int = 0) -> str:
    """What a subscriber shows as choice ``index``'s text: its kept deltas, in order."""
    return "".join(e.delta or "" for e in kept_chunks(events, index))


def reconstruct_tool_calls(events: Sequence[StreamEvent], index: int = 0) -> list[StreamedCall]:
    """Choice ``index``'s tool calls, in call order, from its kept fragments: ``id`` and ``name``
    from the fragments that carry them, the ``arguments_delta`` pieces joined."""
    calls: dict[int, StreamedCall] = {}
    for event in kept_chunks(events, index):
        fragment = event.tool_call
        if fragment is None:
            continue
        known = calls.get(fragment.index, StreamedCall(None, None, ""))
        calls[fragment.index] = StreamedCall(
            known.id or fragment.id, known.name or fragment.name, known.arguments + fragment.arguments_delta
        )
    return [calls[number] for number in sorted(calls)]


def _chunk_breach(events: Sequence[StreamEvent]) -> str | None:
    """Each chunk is text or a fragment, and a call's first fragment names it."""
    seen: set[tuple[int | None, int, int]] = set()
    for event in events:
        if event.type != "chunk":
            continue
        if event.index is None or (event.delta is None) == (event.tool_call is None):
            return f"chunk {event.seq} is not one choice's text or one fragment: {event!r}"
        if event.tool_call is not None:
            call = (event.attempt, event.index, event.tool_call.index)
            if call not in seen and (event.tool_call.id is None or event.tool_call.name is None):
                return f"the first fragment of call {call} carries no id or name: {event!r}"
            seen.add(call)
    return None


def _reply_breach(events: Sequence[StreamEvent], reply: ChatReply) -> str | None:
    """The kept chunks spell each of the reply's choices: text and tool calls."""
    for number, answer in enumerate(reply.replies):
        index = answer.meta.index if answer.meta.index is not None else number
        text = reconstruct_text(events, index)
        if text != (answer.content or ""):
            return f"the kept deltas of choice {index} {text!r} are not the reply {answer.content!r}"
        streamed = reconstruct_tool_calls(events, index)
        stored = [StreamedCall(c.id, c.function.name, c.function.arguments) for c in answer.tool_calls or []]
        if streamed != stored:
            return f"the kept fragments of choice {index} {streamed!r} are not the reply's calls {stored!r}"
    return None


def contract_breach(
    events: Sequence[StreamEvent],
    request_id: str | None = None,
    *,
    reply: ChatReply | None = None,
    expect_start: bool = True,
    streamed: bool = True,
) -> str | None:
    """The first rule of the stream contract ``events`` break, or None when they keep them all.

    ``request_id``: every event is of that request (else: all of one request). ``reply``: the
    terminal event carries it, and a succeeded reply's choices are what a subscriber shows.
    ``expect_start=False`` for a request refused before it started (no ``start`` event);
    ``streamed=False`` for a request sent with ``stream = false`` (its text is in the reply only).
    """
    types = [e.type for e in events]
    if not events:
        return f"no events for {request_id}"
    seqs = [e.seq for e in events]
    if seqs != list(range(len(events))):
        return f"seq is not 0..{len(events) - 1} without a gap: {seqs}"
    ids = {e.request_id for e in events}
    if len(ids) != 1 or (request_id is not None and ids != {request_id}):
        return f"events of {ids}, expected {request_id or 'one request'}"
    if expect_start and (types[0] != "start" or types.count("start") != 1):
        return f"not one start event, first: {types}"
    if sum(e.is_terminal for e in events) != 1 or not events[-1].is_terminal:
        return f"not exactly one terminal event, last: {types}"
    # Attempt numbers never restart: each attempt's chunks come from one provider, in order.
    chunk_attempts = [e.attempt or 0 for e in events if e.type == "chunk"]
    if chunk_attempts != sorted(chunk_attempts):
        return f"chunk attempts go back: {chunk_attempts}"
    breach = _chunk_breach(events)
    if breach is not None:
        return breach
    if reply is not None:
        if events[-1].reply != reply:
            return f"the terminal event does not carry the stored reply: {events[-1].reply!r} != {reply!r}"
        if streamed and reply.status == "succeeded":
            return _reply_breach(events, reply)
    return None


def assert_well_formed(
    events: Sequence[StreamEvent], request_id: str | None = None, *, expect_start: bool = True
) -> None:
    """``events`` keep the stream contract (see ``contract_breach``)."""
    breach = contract_breach(events, request_id, expect_start=expect_start)
    assert breach is None, breach


def assert_coherent(
    events: Sequence[StreamEvent],
    reply: ChatReply | None,
    request_id: str,
    *,
    expect_start: bool = True,
    streamed: bool = True,
) -> ChatReply:
    """One coherent answer: a stored ``reply``, and ``events`` that keep the stream contract and
    end with it; return the reply."""
    assert reply is not None, f"no reply stored for {request_id}; events {[e.type for e in events]}"
    breach = contract_breach(events, request_id, reply=reply, expect_start=expect_start, streamed=streamed)
    assert breach is None, breach
    return reply
