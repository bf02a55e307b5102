"""``providers.errors``: the failure a provider error becomes once chunks were streamed."""

from __future__ import annotations

from providers import errors


def test_stream_interrupted_after_chunks_names_the_count_and_keeps_the_cause() -> None:
    cause = errors.ServerError("p: HTTP 502", status_code=502)

    interrupted = errors.StreamInterrupted.after(cause, 3)

    assert type(interrupted) is errors.StreamInterrupted
    assert interrupted.message == "p: HTTP 502 (after 3 chunks)"
    assert interrupted.__cause__ is cause
    assert interrupted.code == "stream_interrupted"
