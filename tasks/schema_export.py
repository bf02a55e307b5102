"""Write (or check) the JSON Schema files in ``schemas/`` from the wire models.

``python -m tasks.schema_export`` rewrites them; ``--check`` exits 1 if any file differs from
what the models generate (CI runs it through the test suite).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from tasks.contract.schemas import ChatReply, ChatRequest, ImageReply, ImageRequest, StreamEvent

SCHEMA_MODELS: dict[str, type[BaseModel]] = {
    "chat_request.schema.json": ChatRequest,
    "chat_reply.schema.json": ChatReply,
    "stream_event.schema.json": StreamEvent,
    "image_request.schema.json": ImageRequest,
    "image_reply.schema.json": ImageReply,
}
# What producers send is described as it validates; the rest as workers write it.
REQUEST_MODELS: frozenset[type[BaseModel]] = frozenset({ChatRequest, ImageRequest})
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "schemas"


def render(model: type[BaseModel]) -> str:
    """The JSON Schema of ``model`` as stable, pretty JSON text (validation mode for requests,
    serialization mode for what workers emit)."""
    mode: Literal["validation", "serialization"] = "validation" if model in REQUEST_MODELS else "serialization"
    schema = model.model_json_schema(mode=mode)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://cascade.invalid/schemas/{model.__name__}.v1.json"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if a file is out of date")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args(argv)
    stale = []
    for filename, model in SCHEMA_MODELS.items():
        path = args.dir / filename
        text = render(model)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(filename)
        else:
            path.write_text(text)
    if stale:
        print(f"out of date: {', '.join(stale)}; run python -m tasks.schema_export", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
