"""Cascade's worker app with ``bench.tail_probe`` installed: ``celery -A bench.tail_cascade worker``.

``BENCH_TAIL_ARM`` names what this worker leaves out, for an A/B against a worker without it
(``bench.tail``): ``no-gc-freeze`` unfreezes what warm-up froze.
"""

from __future__ import annotations

import gc
import os
from typing import Any

from celery.signals import worker_process_init

import worker.signals  # noqa: F401 - Cascade's own handlers connect first: the arm's run after them
from bench import tail_probe
from worker.celery_app import app

__all__ = ["app"]

ARM = os.environ.get("BENCH_TAIL_ARM", "")


def _apply_arm(**_: Any) -> None:
    if ARM == "no-gc-freeze":
        gc.unfreeze()


tail_probe.install(cascade=True)
worker_process_init.connect(_apply_arm, weak=False)
