"""Figures the fault suite reports at the end of the run (``pytest_terminal_summary`` in
``conftest.py``): recovery times and the load run's counts."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Where the load run's figures are written, for the README's reliability section.
LOAD_REPORT = Path(os.environ.get("CASCADE_FAULTS_REPORT", REPO / "build" / "faults-load-figures.txt"))

FIGURES: dict[str, str] = {}
LOAD_FIGURES: dict[str, str] = {}


def record(name: str, value: str) -> None:
    """Report ``name: value`` in the suite's summary."""
    FIGURES[name] = value


def record_load(figures: dict[str, str]) -> Path:
    """Report the load run's figures last, and write them to ``LOAD_REPORT``."""
    LOAD_FIGURES.clear()
    LOAD_FIGURES.update(figures)
    LOAD_REPORT.parent.mkdir(parents=True, exist_ok=True)
    width = max(len(name) for name in figures)
    LOAD_REPORT.write_text("".join(f"{name.ljust(width)}  {value}\n" for name, value in figures.items()))
    return LOAD_REPORT
