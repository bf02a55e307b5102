"""``bench.tail``'s own parts, without a stack: the probe records each collection as a
(generation, start, stop) triple, and the report names the slowest requests with what ran
beside them."""

from __future__ import annotations

import time

from bench import tail_probe
from bench.overhead import Timing
from bench.tail import Sent, report


def test_the_probe_records_a_collection_with_its_generation() -> None:
    tail_probe._take_gcs(0.0)  # nothing left from another test
    before = time.time()
    tail_probe._on_gc("start", {"generation": 2})
    tail_probe._on_gc("stop", {"generation": 2})
    [(generation, start, stop)] = tail_probe._take_gcs(before)
    assert generation == 2 and before <= start <= stop


def _request(number: int, ttft_ms: float, gcs: list[tuple[str, int, float]]) -> Sent:
    sent = 1000.0 + number
    stamps = {"sent": sent, "prerun": sent + 0.002, "chunk_in": sent + ttft_ms / 1000 - 0.001}
    stamps["read"] = sent + ttft_ms / 1000
    record = Sent("cascade", f"r{number}", sent, Timing(ttft_ms / 1000, ttft_ms / 1000 + 0.04), stamps, gcs)
    return record


def test_the_report_lists_the_slowest_requests_with_their_collections() -> None:
    records = [_request(n, 27.0, []) for n in range(39)]
    records.append(_request(39, 118.0, [("pool:1", 2, 90.5)]))
    text = report(records, (0.0, 0.0))
    assert "requests with a collection during them: 1 of 40, 1 of the slowest 2" in text
    assert "118.0 |" in text and "pool g2 90.50" in text
