"""Reading what a dead run of a request left in its event stream, so a rerun continues it.

A worker that died mid-request leaves its events (``start``, chunks, fallbacks) but no
terminal event. The rerun rebuilds the attempts from them, marks the attempt that was
streaming as lost (error type ``worker_lost``, announced with a ``fallback`` event so
subscribers discard its deltas), and resumes the chain at that attempt's provider.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import redis

from tasks.contract import keys
from tasks.contract.schemas import AttemptRecord, StreamEvent

WORKER_LOST = "worker_lost"


@dataclass
class LostRun:
    """What an earlier, unfinished run of this request did."""

    attempts: list[AttemptRecord] = field(default_factory=list)
    lost: AttemptRecord | None = None
    resume_index: int | None = None


def read_lost_run(client: redis.Redis, request_id: str, since_seq: int, chain: list[str]) -> LostRun:
    """The attempts of the events from ``since_seq`` on (those of the dead run)."""
    entries: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange(keys.events_stream(request_id))  # type: ignore[assignment]
    events = [StreamEvent.model_validate_json(fields[keys.EVENT_FIELD.encode()]) for _, fields in entries]
    events = [event for event in events if event.seq >= since_seq]
    run = LostRun()
    chunks: dict[int, tuple[str, int]] = {}  # attempt -> (provider, chunk count)
    for event in events:
        # An image event (cascade.image) is an attempt's output as a chunk is.
        if event.type in ("chunk", "image") and event.attempt is not None and event.provider:
            provider, count = chunks.get(event.attempt, (event.provider, 0))
            chunks[event.attempt] = (provider, count + 1)
        elif event.type == "fallback" and event.attempt is not None and event.provider:
            run.attempts.append(_record(event.provider, event.attempt, event.error_type, chain, chunks))
    failed = {record.attempt for record in run.attempts}
    streaming = [attempt for attempt in chunks if attempt not in failed]
    if streaming:
        attempt = max(streaming)
        run.lost = _record(chunks[attempt][0], attempt, WORKER_LOST, chain, chunks)
        run.attempts.append(run.lost)
    if run.attempts:
        last = max(run.attempts, key=lambda record: record.attempt)
        run.resume_index = last.index
    return run


def _record(
    provider: str, attempt: int, error_type: str | None, chain: list[str], chunks: dict[int, tuple[str, int]]
) -> AttemptRecord:
    return AttemptRecord(
        provider=provider,
        index=chain.index(provider) if provider in chain else 0,
        attempt=attempt,
        outcome="failed",
        error_type=error_type,
        chunks=chunks.get(attempt, (provider, 0))[1],
    )
