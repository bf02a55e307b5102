"""Worker TOML files written by the test harnesses (integration and fault suites)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_config(path: Path, providers: Mapping[str, Mapping[str, Any]], chains: Mapping[str, Iterable[str]]) -> Path:
    """Write a worker TOML file: ``[providers.<id>]`` tables and a ``[chains]`` table (creating
    the parent folder if needed)."""
    lines: list[str] = []
    for provider_id, entry in providers.items():
        lines.append(f"[providers.{provider_id}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in entry.items())
        lines.append("")
    lines.append("[chains]")
    lines.extend(f"{name} = {_toml_value(list(ids))}" for name, ids in chains.items())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
