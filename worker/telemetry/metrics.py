"""Metrics: what a finished request, a hand-off and a cooldown add to the worker's instruments,
and the queue-depth gauges an autoscaler reads.

Instruments come from an OpenTelemetry ``Meter`` (the global one in a worker, an in-memory one
in tests). Cascade's own metrics use short attribute names (``chain``, ``provider``...) so
PromQL stays readable; the two GenAI client metrics follow the semantic conventions.
Timings recorded once per request (duration, time to first token, queue time) are recorded
where the request ends, from the reply's ``meta.timings``, so a request that hopped queues
counts once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import redis
from opentelemetry.metrics import CallbackOptions, Meter, Observation

from settings import ProviderConfigBase
from tasks.contract.schemas import AttemptRecord, ChatReply, ChatRequest
from worker.state.cooldown import COOLDOWN_KEY
from worker.telemetry import genai

logger = logging.getLogger(__name__)

METER_NAME = "cascade"

# Histogram bucket boundaries (the SDK's defaults are for milliseconds).
_SECONDS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600]
_TTFT_SECONDS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
_TOKENS_PER_SECOND = [1, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000]
_TOKENS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576]  # as the GenAI conventions advise

# kombu's Redis transport keeps one list per priority step: the queue's name for step 0 and
# name + "\x06\x16" + step for the others (kombu.transport.redis.PRIORITY_STEPS).
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


def _attributes(**values: Any) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def fallbacks(attempts: Sequence[AttemptRecord], first: int, *, chain_continues: bool) -> list[AttemptRecord]:
    """The attempts from ``first`` on after which the chain moved on to another provider
    (a retry of the same provider is no fallback); ``chain_continues`` when the request was
    handed off, so its last attempt here was followed by one on another queue."""
    moved = []
    for position in range(first, len(attempts)):
        record = attempts[position]
        if record.outcome not in ("failed", "skipped"):
            continue
        following = attempts[position + 1] if position + 1 < len(attempts) else None
        if (following is not None and following.provider != record.provider) or (following is None and chain_continues):
            moved.append(record)
    return moved


class CascadeMetrics:
    """Cascade's instruments; see the README's metrics table for what each one means."""

    def __init__(self, meter: Meter) -> None:
        counter = meter.create_counter
        histogram = meter.create_histogram
        self.requests = counter("cascade.requests", "{request}", "Requests that ended, by chain, status, error type")
        self.handoffs = counter("cascade.handoffs", "{handoff}", "Requests sent on to another queue")
        self.attempts = counter("cascade.attempts", "{attempt}", "Provider calls and skips, by outcome and error")
        self.fallbacks = counter("cascade.fallbacks", "{fallback}", "Times the chain moved past a provider")
        self.cooldowns = counter("cascade.cooldowns", "{cooldown}", "Provider cooldowns this worker started")
        self.duration = histogram(
            "cascade.request.duration", "s", "Start to terminal event", explicit_bucket_boundaries_advisory=_SECONDS
        )
        self.ttft = histogram(
            "cascade.request.time_to_first_token",
            "s",
            "Start to the first streamed chunk",
            explicit_bucket_boundaries_advisory=_TTFT_SECONDS,
        )
        self.queued = histogram(
            "cascade.request.queue_time", "s", "Submit to start", explicit_bucket_boundaries_advisory=_SECONDS
        )
        self.tokens_per_second = histogram(
            "cascade.output.tokens_per_second",
            "{token}/s",
            "Output tokens per second of the attempt that answered",
            explicit_bucket_boundaries_advisory=_TOKENS_PER_SECOND,
        )
        self.operation_duration = histogram(
            "gen_ai.client.operation.duration",
            "s",
            "GenAI operation duration (one provider call)",
            explicit_bucket_boundaries_advisory=_SECONDS,
        )
        self.token_usage = histogram(
            "gen_ai.client.token.usage",
            "{token}",
            "Input and output tokens of the call that answered",
            explicit_bucket_boundaries_advisory=_TOKENS,
        )

    def record_attempts(
        self,
        attempts: Sequence[AttemptRecord],
        first: int,
        providers: Mapping[str, ProviderConfigBase],
        *,
        reply: ChatReply | None,
        chain_continues: bool,
    ) -> None:
        """Count the attempts made on this hop (``attempts[first:]``) and the fallbacks."""
        for record in attempts[first:]:
            self.attempts.add(
                1, _attributes(provider=record.provider, outcome=record.outcome, error_type=record.error_type)
            )
            if record.outcome == "skipped":
                continue
            config = providers.get(record.provider)
            attributes = {**genai.provider_attributes(config), **_attributes(**{genai.ERROR_TYPE: record.error_type})}
            if record.outcome == "succeeded" and reply is not None:
                self._record_answer(record, reply, attributes)
            else:
                self.operation_duration.record(record.duration_ms / 1000, attributes)
        for record in fallbacks(attempts, first, chain_continues=chain_continues):
            self.fallbacks.add(1, _attributes(provider=record.provider, error_type=record.error_type))

    def _record_answer(self, record: AttemptRecord, reply: ChatReply, attributes: dict[str, Any]) -> None:
        if reply.replies:
            attributes[genai.RESPONSE_MODEL] = reply.replies[0].meta.model
        self.operation_duration.record(record.duration_ms / 1000, attributes)
        input_tokens = sum(r.meta.usage.prompt_tokens for r in reply.replies)
        output_tokens = sum(r.meta.usage.completion_tokens for r in reply.replies)
        self.token_usage.record(input_tokens, {**attributes, genai.TOKEN_TYPE: "input"})
        self.token_usage.record(output_tokens, {**attributes, genai.TOKEN_TYPE: "output"})
        if output_tokens > 0 and record.duration_ms > 0:
            self.tokens_per_second.record(output_tokens / (record.duration_ms / 1000), {"provider": record.provider})

    def request_finished(self, request: ChatRequest, reply: ChatReply) -> None:
        """Count the request and record its timings (once per request, wherever it ended)."""
        error_type = reply.error.type if reply.error is not None else None
        self.requests.add(1, _attributes(chain=request.chain, status=reply.status, error_type=error_type))
        timings = reply.meta.timings
        chain = {"chain": request.chain}
        if timings.total_ms is not None:
            self.duration.record(timings.total_ms / 1000, {**chain, "status": reply.status})
        if timings.ttft_ms is not None:
            self.ttft.record(timings.ttft_ms / 1000, chain)
        if timings.queued_ms is not None:
            self.queued.record(timings.queued_ms / 1000, chain)

    def request_handed_off(self, request: ChatRequest, queue: str) -> None:
        """Count a hand-off to ``queue``."""
        self.handoffs.add(1, {"chain": request.chain, "queue": queue})

    def cooldown_tripped(self, provider_id: str) -> None:
        """Count a cooldown this worker started."""
        self.cooldowns.add(1, {"provider": provider_id})


def observe_redis(meter: Meter, client: redis.Redis, queues: Sequence[str], providers: Sequence[str]) -> None:
    """Register the gauges read from Redis at each collection: ``cascade.queue.depth`` (messages
    waiting per queue) and ``cascade.provider.cooling_down`` (1 while a provider is skipped).

    Only the process that registered them reads Redis: a forked child inherits the meter (and
    an OTLP reader's thread, restarted after the fork) but must not report the same values.
    """
    owner = os.getpid()

    def depth(_: CallbackOptions) -> Iterable[Observation]:
        if os.getpid() != owner:
            return []
        pipe = client.pipeline(transaction=False)
        for queue in queues:
            for suffix in _PRIORITY_SUFFIXES:
                pipe.llen(queue + suffix)
        try:
            sizes = pipe.execute()
        except redis.RedisError as exc:  # Redis restarting: no value beats a wrong one
            logger.info("queue depth not read: %s", type(exc).__name__)
            return []
        steps = len(_PRIORITY_SUFFIXES)
        return [Observation(sum(sizes[i * steps : (i + 1) * steps]), {"queue": q}) for i, q in enumerate(queues)]

    def cooling(_: CallbackOptions) -> Iterable[Observation]:
        if os.getpid() != owner or not providers:
            return []
        pipe = client.pipeline(transaction=False)
        for provider_id in providers:
            pipe.exists(COOLDOWN_KEY.format(provider_id=provider_id))
        try:
            flags = pipe.execute()
        except redis.RedisError:
            return []
        return [Observation(int(bool(flag)), {"provider": p}) for p, flag in zip(providers, flags, strict=True)]

    meter.create_observable_gauge(
        "cascade.queue.depth", [depth], unit="{message}", description="Messages waiting in each queue"
    )
    meter.create_observable_gauge(
        "cascade.provider.cooling_down", [cooling], unit="1", description="1 while a provider is in cooldown"
    )
