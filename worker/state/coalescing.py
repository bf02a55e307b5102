"""The coalescing of ``worker.state.publisher``: a request's chunk waiting for its window to end."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class PendingChunk:
    """Chunk deltas of one attempt waiting for their window to end."""

    fields: dict[str, Any]
    due: float
    deltas: list[str] = field(default_factory=list)

    def merged(self) -> dict[str, Any]:
        return {**self.fields, "delta": "".join(self.deltas)}

    def same_attempt(self, fields: dict[str, Any]) -> bool:
        return all(self.fields.get(name) == fields.get(name) for name in ("provider", "attempt"))
