"""Scoring an answer with the provider that gave it (providers.scoring.sampler): the decision
calls it makes, the tally it scores, and every way it ends without a score."""

from __future__ import annotations

import threading
import time

import pytest

from providers import errors
from providers.base import ChatProvider, OnChunk, ProviderCall
from providers.scoring import HallucinationScoreConfig, build_skeletons, score_decisions
from providers.scoring.sampler import ScoringOutcome, last_user_prompt, score_answer, scoring_config
from settings.providers import OpenAIConfig, ScriptedConfig
from tasks.contract.schemas import AssistantReply, ChatMessage, HallucinationScoreRequest, ReplyMeta, Usage

PROMPT = 'Who wrote "The Old Man and the Sea" in 1952?'


class DecidingProvider(ChatProvider):
    """Answers each decision prompt by a rule on its text; records every call."""

    def __init__(self, fail_on: str | None = None) -> None:
        super().__init__("decider", OpenAIConfig(model="gpt-test"))
        self.calls: list[ProviderCall] = []
        self._lock = threading.Lock()
        self._fail_on = fail_on

    def run(self, call: ProviderCall, on_chunk: OnChunk) -> list[AssistantReply]:
        with self._lock:
            self.calls.append(call)
        text = call.messages[-1].text()
        if self._fail_on is not None and self._fail_on in text:
            raise errors.RateLimited("decider: 429")
        # The full prompt keeps its quoted title: the model would answer; a masked one refuses.
        decision = "ANSWER" if '"The Old Man and the Sea"' in text else "REFUSE"
        usage = Usage(prompt_tokens=10, completion_tokens=1, total_tokens=11)
        return [AssistantReply(content=decision, meta=ReplyMeta(model="gpt-test", usage=usage))]


def conversation() -> list[ChatMessage]:
    return [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content=PROMPT),
        ChatMessage(role="assistant", content="Ernest Hemingway."),
    ]


def test_every_prompt_is_asked_n_samples_times_and_the_tally_is_scored() -> None:
    config = HallucinationScoreConfig(n_samples=3, m=4, skeleton_policy="closed_book")
    provider = DecidingProvider()
    outcome = score_answer(provider, conversation(), config, deadline=time.monotonic() + 30)
    assert outcome.error is None and outcome.score is not None
    assert outcome.calls == len(provider.calls) == 3 * (4 + 1)
    assert outcome.usage == Usage(prompt_tokens=150, completion_tokens=15, total_tokens=165)
    # The same numbers as scoring the tally by hand: the full prompt answers every time, each
    # skeleton refuses whenever its masking removed the quoted title.
    skeletons = build_skeletons(PROMPT, 4, "closed_book")
    by_hand = [["answer" if '"The Old Man and the Sea"' in s else "refuse"] * 3 for s in skeletons.prompts]
    expected = score_decisions(["answer"] * 3, by_hand, config)  # type: ignore[arg-type]
    assert outcome.score == expected
    meta = outcome.meta()
    assert meta["hallucination_decision"] == expected.decision
    assert meta["hallucination_risk"] == expected.risk
    assert meta["hallucination_scoring_calls"] == 15


def test_decision_calls_never_stream_and_carry_the_config() -> None:
    config = HallucinationScoreConfig(n_samples=1, m=1, temperature=0.7)
    provider = DecidingProvider()
    score_answer(provider, conversation(), config, deadline=time.monotonic() + 30)
    assert provider.calls and all(not call.stream for call in provider.calls)
    assert {call.generation_kwargs["temperature"] for call in provider.calls} == {0.7}
    assert all(call.generation_kwargs["max_tokens"] <= 8 for call in provider.calls)


def test_a_provider_type_that_cannot_be_scored_is_left_unscored_with_the_reason() -> None:
    provider = DecidingProvider()
    provider.config = ScriptedConfig(text="x")
    outcome = score_answer(provider, conversation(), HallucinationScoreConfig(), deadline=time.monotonic() + 30)
    assert outcome.score is None and outcome.calls == 0
    assert outcome.meta()["hallucination_error"] == "provider type 'scripted' cannot be scored"


def test_a_failing_decision_call_leaves_the_answer_unscored() -> None:
    provider = DecidingProvider(fail_on="Who wrote")
    outcome = score_answer(
        provider, conversation(), HallucinationScoreConfig(n_samples=2, m=1), deadline=time.monotonic() + 30
    )
    assert outcome.score is None
    assert outcome.error == "a decision call failed: rate_limited"


def test_a_deadline_already_passed_leaves_the_answer_unscored() -> None:
    outcome = score_answer(
        DecidingProvider(), conversation(), HallucinationScoreConfig(n_samples=1, m=1), deadline=time.monotonic() - 1
    )
    assert outcome.score is None and outcome.error is not None and "deadline" in outcome.error


def test_no_user_prompt_means_no_score() -> None:
    outcome = score_answer(
        DecidingProvider(), [ChatMessage(role="system", content="x")], HallucinationScoreConfig(), deadline=1e12
    )
    assert outcome.error == "the conversation has no user prompt to score"
    assert last_user_prompt(conversation()) == PROMPT


def test_a_request_option_fills_in_haystack_defaults_and_is_checked() -> None:
    config = scoring_config(HallucinationScoreRequest(n_samples=2))
    assert config.n_samples == 2 and config.m == HallucinationScoreConfig().m
    with pytest.raises(ValueError, match="n_samples"):
        scoring_config({"n_samples": 32, "m": 16})  # past the cap on decision samples


def test_an_outcome_without_a_score_has_no_haystack_keys() -> None:
    meta = ScoringOutcome(error="why").meta()
    assert "hallucination_decision" not in meta and meta["hallucination_error"] == "why"
