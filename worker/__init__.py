"""The Cascade worker: ``celery -A worker worker -Q chat``.

``app`` is built on first access, so importing ``worker.state.publisher`` or ``worker.state.store`` (as the
task does) does not load the worker's configuration.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in {"app", "celery"}:
        from worker.celery_app import app

        return app
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
