"""The Haystack baseline's app with ``bench.tail_probe`` installed: ``celery -A bench.tail_haystack worker``."""

from __future__ import annotations

from bench import tail_probe
from bench.haystack_baseline import app

__all__ = ["app"]

tail_probe.install(cascade=False)
tail_probe.probe_haystack()
