"""Which waiting chunks may merge into one ``chunk`` event (``worker.state.publisher``).

A chunk event carries one choice's text (``delta``) or one fragment of one tool call
(``tool_call``), of one attempt. So chunks that wait for their coalescing window are kept in
groups, and only chunks of one group merge:

- text of the same attempt and choice (``index``): the deltas are concatenated;
- fragments of the same attempt, choice and call (``tool_call.index``): the ``arguments_delta``
  pieces are concatenated, the ``id`` and ``name`` kept from the fragment that had them (a
  call's first), so a merged event reads exactly as the fragments it replaces would.

Text never merges with a tool fragment, nor the fragments of two choices or two calls. The
groups of a window go out together, one event each, in the order each group started: what a
subscriber rebuilds per choice and per call is the same text in the same order as if every
chunk had been published at once. Chunks of two attempts never wait together: a chunk of
another attempt publishes what waits first (its attempt may be voided by a ``fallback``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# What tells two groups apart: (provider, attempt, choice, call or None for text).
GroupKey = tuple[Any, Any, int, int | None]


def tool_call_fields(tool_call: Any) -> dict[str, Any]:
    """A chunk's ``tool_call`` as a plain dict (a ``ToolCallDelta`` or a dict already)."""
    if hasattr(tool_call, "model_dump"):
        return dict(tool_call.model_dump(exclude_none=True))
    return dict(tool_call)


def group_key(fields: dict[str, Any]) -> GroupKey:
    """The group a chunk's fields belong to."""
    tool_call = fields.get("tool_call")
    call_index = tool_call_fields(tool_call).get("index", 0) if tool_call is not None else None
    return (fields.get("provider"), fields.get("attempt"), int(fields.get("index") or 0), call_index)


@dataclass
class ChunkGroup:
    """Chunks that merge into one event: the first one's fields and every piece in order."""

    fields: dict[str, Any]
    pieces: list[str] = field(default_factory=list)
    # A tool call's id and name, from whichever fragment gave them first.
    named: dict[str, Any] = field(default_factory=dict)

    def add(self, fields: dict[str, Any]) -> None:
        tool_call = fields.get("tool_call")
        if tool_call is None:
            self.pieces.append(str(fields.get("delta") or ""))
            return
        fragment = tool_call_fields(tool_call)
        for name in ("id", "name"):
            if fragment.get(name) is not None:
                self.named.setdefault(name, fragment[name])
        self.pieces.append(str(fragment.get("arguments_delta") or ""))

    def merged(self) -> dict[str, Any]:
        """The fields of the one event that stands for the whole group."""
        tool_call = self.fields.get("tool_call")
        if tool_call is None:
            return {**self.fields, "delta": "".join(self.pieces)}
        fragment = {**tool_call_fields(tool_call), **self.named, "arguments_delta": "".join(self.pieces)}
        return {**self.fields, "tool_call": fragment}


@dataclass
class PendingChunks:
    """The chunks of one attempt waiting for their window to end (``due``), by group."""

    due: float
    groups: dict[GroupKey, ChunkGroup] = field(default_factory=dict)

    def add(self, fields: dict[str, Any]) -> None:
        """Let a chunk wait with the others of its group (a new group if it is the first)."""
        key = group_key(fields)
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = ChunkGroup(dict(fields))
        group.add(fields)

    def same_attempt(self, fields: dict[str, Any]) -> bool:
        """True if a chunk with ``fields`` may wait with these (same provider and attempt)."""
        first = next(iter(self.groups.values()), None)
        if first is None:
            return True
        return all(first.fields.get(name) == fields.get(name) for name in ("provider", "attempt"))

    def events(self) -> list[dict[str, Any]]:
        """The fields of the events that publish what waits: one per group, in order."""
        return [group.merged() for group in self.groups.values()]

    def __len__(self) -> int:
        return len(self.groups)
