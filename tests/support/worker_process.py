"""What the harnesses' worker records share: whether the process lives, and its log (also shown
under a failed test)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from pathlib import Path

import pytest


class WorkerProcess:
    """A mixin of a worker record with a ``name``, the ``log_path`` its output goes to and the
    started ``proc`` (None before it starts)."""

    name: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None

    def alive(self) -> bool:
        """The worker's main process is running."""
        return self.proc is not None and self.proc.poll() is None

    def assert_alive(self) -> None:
        """Raise ``RuntimeError`` with the log's tail if the worker's main process exited."""
        if not self.alive():
            code = None if self.proc is None else self.proc.returncode
            raise RuntimeError(f"worker {self.name} exited with {code}\n{self.log_tail()}")

    def log_text(self) -> str:
        """The worker's whole log (empty before it exists)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines of the worker's log."""
        return "\n".join(self.log_text().splitlines()[-lines:])


def with_worker_logs(report: pytest.TestReport, workers: Iterable[WorkerProcess], *, lines: int) -> pytest.TestReport:
    """``report`` of a failed test call with the last ``lines`` lines of each worker's log added
    as sections (the suites' ``pytest_runtest_makereport`` hooks)."""
    if report.when == "call" and report.failed:
        for started in workers:
            report.sections.append((f"worker {started.name} log (tail)", started.log_tail(lines)))
    return report
