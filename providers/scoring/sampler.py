"""Scoring an answer with the provider that gave it: the decision calls and their tally.

After the winning provider answers, the last user prompt and its ``m`` skeletons
(``providers.scoring.skeletons``) are each put to that same provider ``n_samples`` times as a
one-word ANSWER/REFUSE question (``providers.scoring.decisions``); the tallies go to
``score_decisions`` (``providers.scoring.edfl``). The calls run concurrently, at most
``max_parallel`` at a time, never stream, and share the request's deadline: scoring that cannot
finish in time fails with a reason, and the answer stands unscored.

Only providers whose type is in ``SCORABLE_TYPES`` are scored: the decision prompts and their
temperature are tuned for OpenAI-family chat models, as Haystack's scored generator is.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from providers import errors
from providers.base import ChatProvider, ProviderCall, StreamingChunk
from providers.scoring.config import HallucinationScoreConfig
from providers.scoring.decisions import DECISION_MAX_TOKENS, decision_messages, parse_decision
from providers.scoring.edfl import DecisionLabel, HallucinationScore, score_decisions
from providers.scoring.skeletons import build_skeletons
from tasks.contract.schemas import AssistantReply, ChatMessage, Usage

# Provider types whose answers can be scored (Chat Completions and Azure OpenAI chat).
SCORABLE_TYPES = frozenset({"openai", "azure_openai"})
# Decision calls in flight at once for one request.
DEFAULT_MAX_PARALLEL = 8


@dataclass
class ScoringOutcome:
    """What scoring one answer produced: a score, or the reason there is none, with the calls
    it made and their token usage either way."""

    score: HallucinationScore | None = None
    error: str | None = None
    calls: int = 0
    usage: Usage = field(default_factory=Usage)

    def meta(self) -> dict[str, Any]:
        """The reply-meta keys: Haystack's three (or ``hallucination_error``), plus the calls."""
        meta: dict[str, Any] = {
            "hallucination_scoring_calls": self.calls,
            "hallucination_scoring_usage": self.usage,
        }
        if self.score is not None:
            meta.update(self.score.meta())
        else:
            meta["hallucination_error"] = self.error
        return meta


def scoring_config(requested: Any) -> HallucinationScoreConfig:
    """The full config of a request's ``hallucination_score`` option (absent fields take
    Haystack's defaults); raises ``pydantic.ValidationError`` on a combination out of range."""
    fields = requested.model_dump(exclude_none=True) if hasattr(requested, "model_dump") else dict(requested or {})
    return HallucinationScoreConfig.model_validate(fields)


def last_user_prompt(messages: Sequence[ChatMessage]) -> str | None:
    """The text of the conversation's last user message (the prompt the answer replies to)."""
    for message in reversed(messages):
        if message.role == "user":
            return message.text()
    return None


def score_answer(
    provider: ChatProvider,
    messages: Sequence[ChatMessage],
    config: HallucinationScoreConfig,
    *,
    deadline: float,
    max_parallel: int = DEFAULT_MAX_PARALLEL,
    clock: Callable[[], float] = time.monotonic,
) -> ScoringOutcome:
    """Score the answer ``provider`` gave to ``messages`` (see the module docstring). Never
    raises for a provider's failure: the outcome says why there is no score."""
    provider_type = getattr(provider.config, "type", "")
    if provider_type not in SCORABLE_TYPES:
        return ScoringOutcome(error=f"provider type {provider_type!r} cannot be scored")
    prompt = last_user_prompt(messages)
    if not prompt or not prompt.strip():
        return ScoringOutcome(error="the conversation has no user prompt to score")
    skeletons = build_skeletons(prompt, config.m, config.skeleton_policy)
    closed_book = skeletons.policy == "closed_book"
    variants = [prompt, *skeletons.prompts]
    jobs = [(variant, sample) for variant in range(len(variants)) for sample in range(config.n_samples)]
    tally: list[list[DecisionLabel]] = [[] for _ in variants]
    outcome = ScoringOutcome()

    def decide(variant: int) -> tuple[DecisionLabel, Usage]:
        call = ProviderCall(
            messages=[ChatMessage.model_validate(m) for m in decision_messages(variants[variant], closed_book)],
            generation_kwargs={"temperature": config.temperature, "max_tokens": DECISION_MAX_TOKENS},
            stream=False,
            deadline=deadline,
        )
        replies = provider.run(call, _ignore_chunk)
        text = replies[0].content if replies and isinstance(replies[0].content, str) else ""
        return parse_decision(text), replies[0].meta.usage if replies else Usage()

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(max_parallel, len(jobs))))
    try:
        futures = {pool.submit(decide, variant): variant for variant, _sample in jobs}
        remaining = deadline - clock()
        done, not_done = concurrent.futures.wait(futures, timeout=max(0.0, remaining))
        for future in done:
            try:
                label, usage = future.result()
            except errors.CascadeError as exc:
                outcome.error = outcome.error or f"a decision call failed: {exc.code}"
                continue
            outcome.calls += 1
            outcome.usage = _add_usage(outcome.usage, usage)
            tally[futures[future]].append(label)
        if not_done:
            outcome.error = "the request's deadline passed before scoring finished"
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    if outcome.error is not None:
        return outcome
    outcome.score = score_decisions(tally[0], tally[1:], config)
    return outcome


def with_scoring(replies: Sequence[AssistantReply], outcome: ScoringOutcome) -> list[AssistantReply]:
    """``replies`` with the scoring's keys (``ScoringOutcome.meta``) in each reply's meta: the
    score is the prompt's, so every choice of one answer carries the same."""
    keys = outcome.meta()
    return [reply.model_copy(update={"meta": reply.meta.model_copy(update=keys)}) for reply in replies]


def _ignore_chunk(_chunk: StreamingChunk) -> None:
    """Decision calls never stream to subscribers."""


def _add_usage(total: Usage, more: Usage) -> Usage:
    return Usage(
        prompt_tokens=total.prompt_tokens + more.prompt_tokens,
        completion_tokens=total.completion_tokens + more.completion_tokens,
        total_tokens=total.total_tokens + more.total_tokens,
    )
