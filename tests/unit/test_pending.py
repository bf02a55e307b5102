"""Reading request ids out of queued and unacked messages (worker.state.pending) never trips on a
hostile entry: the reaper's pass must not fail because a producer queued junk."""

from __future__ import annotations

import json

from tasks.contract.schemas import REQUEST_ID_HEADER
from worker.state.pending import _ids_in


def test_entries_with_headers_of_the_wrong_type_are_skipped() -> None:
    good = {"headers": {REQUEST_ID_HEADER: "r-1"}, "body": ""}
    hostile = [
        json.dumps({"headers": ["cascade.chat"], "body": ""}),
        json.dumps({"headers": "text", "body": ""}),
        json.dumps([1, 2, 3]),
        "not json {",
        json.dumps(good),
    ]
    assert _ids_in(hostile, unacked=False) == {"r-1"}
    assert _ids_in([json.dumps([entry, "", "chat"]) for entry in ({"headers": [1]}, good)], unacked=True) == {"r-1"}
