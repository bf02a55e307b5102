"""The stream contract every suite checks a request's events against (DESIGN's event stream):
``seq`` from 0 without a gap, one request id, one ``start`` and it is first, exactly one terminal
event and it is last, chunk attempt numbers that never go back, and — given the stored reply —
a terminal event that carries it and kept deltas that spell its text.

``contract_breach`` says what is wrong (or None); ``assert_well_formed`` and ``assert_coherent``
are its assert forms; ``reconstruct_text`` is what a subscriber shows.
"""

from __future__ import annotations

from collections.abc import Sequence

from tasks.contract.schemas import ChatReply, StreamEvent


def reconstruct_text(events: Sequence[StreamEvent]) -> str:
    """What a subscriber shows: the deltas of every attempt no ``fallback`` event voided."""
    voided = {e.attempt for e in events if e.type == "fallback"}
    return "".join(e.delta or "" for e in events if e.type == "chunk" and e.attempt not in voided)


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
    terminal event carries it, and a succeeded reply's text is what a subscriber shows.
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
    if reply is not None:
        if events[-1].reply != reply:
            return f"the terminal event does not carry the stored reply: {events[-1].reply!r} != {reply!r}"
        if streamed and reply.status == "succeeded" and reconstruct_text(events) != reply.replies[0].content:
            return f"the kept deltas {reconstruct_text(events)!r} are not the reply {reply.replies[0].content!r}"
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
