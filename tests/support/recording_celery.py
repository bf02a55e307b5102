"""A stand-in for the producer's Celery app that records what it would send (unit tests of the
client, which check the message without a broker)."""

from __future__ import annotations

from typing import Any


class RecordingCelery:
    """Records each ``send_task`` call as ``(task name, options)``."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def send_task(self, name: str, **options: Any) -> None:
        """Record the task instead of sending it."""
        self.sent.append((name, options))

    def close(self) -> None:
        """Nothing to close."""
