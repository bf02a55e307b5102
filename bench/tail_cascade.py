"""Cascade's worker app with ``bench.tail_probe`` installed: ``celery -A bench.tail_cascade worker``.

``BENCH_TAIL_ARM`` names what this worker leaves out, for an A/B against a worker with it
(``bench.tail --ab``), comma-separated:

- ``no-gc-freeze``: warm-up freezes nothing (``worker.signals.freeze_warm_heap`` is
  disconnected: unfreezing afterwards would not do, as ``gc.unfreeze`` puts the young objects
  of warm-up straight into the oldest generation, where they no longer count towards its
  next collection);
- ``no-release``: the chain leaves tenacity's ``Retrying`` cycle for the garbage collector
  (``providers.chain.release_retrying`` does nothing);
- ``no-hiredis``: redis-py packs commands and parses replies in Python, as without the
  ``hiredis`` package.
"""

from __future__ import annotations

import os
import sys
from typing import Any

ARMS = frozenset(filter(None, os.environ.get("BENCH_TAIL_ARM", "").split(",")))

if "no-hiredis" in ARMS:
    if "redis" in sys.modules:
        raise RuntimeError("redis-py is imported already: too late to leave hiredis out")
    sys.modules["hiredis"] = None  # type: ignore[assignment]  # an import of it raises ImportError

from celery.signals import worker_process_init  # noqa: E402

import worker.signals  # noqa: E402 - Cascade's own handlers connect first: the arm's run after them
from bench import tail_probe  # noqa: E402
from providers import chain  # noqa: E402
from worker.celery_app import app  # noqa: E402

__all__ = ["app"]


def _apply_arms(**_: Any) -> None:
    if "no-release" in ARMS:
        chain.release_retrying = lambda _retrying: None


tail_probe.install(cascade=True)
if "no-gc-freeze" in ARMS:
    worker_process_init.disconnect(worker.signals.freeze_warm_heap)
worker_process_init.connect(_apply_arms, weak=False)
