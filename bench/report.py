"""Writing a benchmark's section into BENCHMARKS.md, leaving the other sections alone."""

from __future__ import annotations

from pathlib import Path

HEADER = (
    "# Benchmarks\n\nEvery figure here was measured by the command shown beside it; "
    "ratios compare runs made side by side.\n"
)


def replace_section(path: Path, heading_prefix: str, section: str) -> None:
    """Replace the ``## ...`` section whose heading starts with ``heading_prefix`` (or append)."""
    text = path.read_text() if path.exists() else HEADER
    parts = text.split("\n## ")
    head, sections = parts[0], ["## " + part for part in parts[1:]]
    kept = [s for s in sections if not s.startswith(heading_prefix)]
    body = "\n".join(s.rstrip("\n") + "\n" for s in [*kept, section])
    path.write_text(head.rstrip("\n") + "\n\n" + body)
