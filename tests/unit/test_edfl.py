"""The EDFL mathematics against values worked out by hand (every quantity in nats)."""

from __future__ import annotations

import math

import pytest

from providers.scoring import (
    EPS,
    DecisionLabel,
    HallucinationScoreConfig,
    bits_to_trust,
    information_budget,
    information_sufficiency_ratio,
    kl_bernoulli,
    laplace_floor,
    p_max_edfl,
    realized_decision,
    roh_bound,
    score_decisions,
    should_answer,
)

A: DecisionLabel = "answer"
R: DecisionLabel = "refuse"
LN = math.log


def samples(answers: int, refusals: int) -> list[DecisionLabel]:
    return [A] * answers + [R] * refusals


# --- KL, its inverse and the bound -------------------------------------------------------


def test_kl_bernoulli_by_hand() -> None:
    # KL(Ber(0.9) || Ber(0.5)) = 0.9 ln(0.9/0.5) + 0.1 ln(0.1/0.5) = 0.529008 - 0.160944
    assert kl_bernoulli(0.9, 0.5) == pytest.approx(0.9 * LN(1.8) + 0.1 * LN(0.2))
    assert kl_bernoulli(0.9, 0.5) == pytest.approx(0.368064, abs=1e-6)
    assert kl_bernoulli(0.3, 0.3) == pytest.approx(0.0, abs=1e-15)
    # At p = 1 only the first term is left: 1 * ln(1/q).
    assert kl_bernoulli(1.0, 0.25) == pytest.approx(LN(4))
    # At p = 0 only the second: ln(1/(1-q)).
    assert kl_bernoulli(0.0, 0.75) == pytest.approx(LN(4))
    # q = 0 is clamped to EPS: KL(Ber(1) || Ber(EPS)) = -ln EPS, about 27.63 nats, finite.
    assert kl_bernoulli(1.0, 0.0) == pytest.approx(-LN(EPS))


def test_p_max_inverts_kl() -> None:
    # Δ = KL(Ber(0.9) || Ber(0.5)), so the largest p with KL(p || 0.5) <= Δ is 0.9.
    delta = 0.9 * LN(1.8) + 0.1 * LN(0.2)
    assert p_max_edfl(delta, 0.5) == pytest.approx(0.9, abs=1e-9)
    assert roh_bound(delta, 0.5) == pytest.approx(0.1, abs=1e-9)
    # No budget: the reliability cannot exceed the prior.
    assert p_max_edfl(0.0, 0.3) == pytest.approx(0.3, abs=1e-9)
    assert roh_bound(0.0, 0.3) == pytest.approx(0.7, abs=1e-9)
    # Δ >= -ln q reaches p = 1 exactly: q = 1/4, Δ = ln 4 → RoH = 0.
    assert p_max_edfl(LN(4), 0.25) == 1.0
    assert roh_bound(LN(4) + 1.0, 0.25) == 0.0


def test_bits_to_trust_by_hand() -> None:
    # B2T = KL(Ber(0.95) || Ber(0.25)) = 0.95 ln(0.95/0.25) + 0.05 ln(0.05/0.75)
    #      = 0.95 * 1.335001 - 0.05 * 2.708050 = 1.268251 - 0.135403 = 1.132848
    assert bits_to_trust(0.25, 0.05) == pytest.approx(0.95 * LN(3.8) + 0.05 * LN(0.05 / 0.75))
    assert bits_to_trust(0.25, 0.05) == pytest.approx(1.132848, abs=1e-6)
    assert laplace_floor(7) == pytest.approx(1 / 9)


# --- the information budget ----------------------------------------------------------------


def test_information_budget_one_sided_and_symmetric() -> None:
    # P(y) = 3/4; skeletons S(y) = 1 and 1/4: terms ln(0.75) = -0.287682 and ln 3 = 1.098612.
    one_sided = information_budget(0.75, [1.0, 0.25], 12.0, "one-sided")
    symmetric = information_budget(0.75, [1.0, 0.25], 12.0, "symmetric")
    assert one_sided == pytest.approx((0.0 + LN(3)) / 2)  # 0.549306
    assert symmetric == pytest.approx((LN(0.75) + LN(3)) / 2)  # ln(2.25)/2 = ln 1.5 = 0.405465
    assert symmetric == pytest.approx(LN(1.5))


def test_information_budget_clips_at_b() -> None:
    # S(y) = 0 is clamped to EPS: ln 1 - ln EPS = 27.63 > B, so each term is B.
    assert information_budget(1.0, [0.0, 0.0], 12.0, "one-sided") == 12.0
    assert information_budget(1.0, [0.0], 2.5, "symmetric") == 2.5
    # Symmetric clipping bounds a negative term at -B: ln EPS - ln 1 = -27.63 → -1.
    assert information_budget(0.0, [1.0], 1.0, "symmetric") == -1.0
    assert information_budget(0.0, [1.0], 1.0, "one-sided") == 0.0
    with pytest.raises(ValueError, match="at least one skeleton"):
        information_budget(1.0, [], 12.0, "one-sided")


# --- ISR and the gate at its threshold -------------------------------------------------------


def test_isr_and_gate_at_the_threshold() -> None:
    assert information_sufficiency_ratio(3.0, 2.0) == 1.5
    assert information_sufficiency_ratio(1.0, 0.0) == math.inf
    assert information_sufficiency_ratio(0.0, 0.0) == 1.0
    # Δ̄ = B2T exactly: ISR = 1 meets a threshold of 1, and Δ̄ >= B2T + 0 holds.
    assert should_answer(2.0, 2.0, isr_threshold=1.0, margin=0.0)
    # ... but not with a margin: 2.0 < 2.0 + 0.2.
    assert not should_answer(2.0, 2.0, isr_threshold=1.0, margin=0.2)
    # ISR = 3/2 = 1.5 exactly meets a threshold of 1.5 and fails one just above it.
    assert should_answer(3.0, 2.0, isr_threshold=1.5, margin=0.0)
    assert not should_answer(3.0, 2.0, isr_threshold=1.5 + 1e-9, margin=0.0)


# --- whole scores: the edges and a middle case -----------------------------------------------


def test_all_samples_answer() -> None:
    # Full prompt and skeletons all answer: y = answer, P(y) = S_k(y) = 1, so Δ̄ = 0.
    # q̄ = q_lo = 1; B2T = KL(0.95 || 1 - EPS) = 0.95 ln 0.95 + 0.05 ln(0.05/EPS) = 1.183
    config = HallucinationScoreConfig()
    score = score_decisions(samples(7, 0), [samples(7, 0)] * 6, config)
    assert (score.y, score.p_y, score.delta_bar) == ("answer", 1.0, 0.0)
    assert (score.q_avg, score.q_lo) == (1.0, 1.0)
    assert score.b2t == pytest.approx(0.95 * LN(0.95) + 0.05 * LN(0.05 / EPS), rel=1e-9)
    assert score.isr == 0.0
    assert score.decision == "REFUSE"
    # No budget, prior 1 - EPS: p_max = q̄, so RoH = EPS, zero for all purposes.
    assert score.risk == pytest.approx(0.0, abs=1e-9)


def test_no_sample_answers() -> None:
    # Everything refuses: y = refuse, P(y) = S_k(y) = 1, Δ̄ = 0; q̄ = 0, q_lo = floor 1/(7+2).
    # B2T = KL(0.95 || 1/9) = 0.95 ln 8.55 + 0.05 ln(0.05 * 9/8) = 2.038634 - 0.143898 = 1.894737
    config = HallucinationScoreConfig()
    score = score_decisions(samples(0, 7), [samples(0, 7)] * 6, config)
    assert (score.y, score.delta_bar, score.q_avg) == ("refuse", 0.0, 0.0)
    assert score.q_lo == pytest.approx(1 / 9)
    assert score.b2t == pytest.approx(0.95 * LN(8.55) + 0.05 * LN(0.05625))
    assert score.b2t == pytest.approx(1.894737, abs=1e-6)
    assert score.decision == "REFUSE"
    # Prior q̄ = 0 (clamped to EPS) with no budget: the bound is 1 - EPS.
    assert score.risk == pytest.approx(1.0, abs=1e-9)


def test_q_at_the_clip() -> None:
    # Full prompt answers, every skeleton refuses: S_k(answer) = 0, clamped to EPS, so each term
    # is ln 1 - ln EPS = 27.63 → clipped to B = 12: Δ̄ = 12. q̄ = 0, q_lo = 1/9 (the floor).
    # B2T = 1.894737 (as above), ISR = 12 / 1.894737 = 6.3333 → ANSWER.
    config = HallucinationScoreConfig()
    score = score_decisions(samples(7, 0), [samples(0, 7)] * 6, config)
    assert score.delta_bar == 12.0
    assert score.isr == pytest.approx(12.0 / 1.894737, rel=1e-6)
    assert score.decision == "ANSWER"
    # RoH = 1 - p where p ln(p/EPS) + (1-p) ln(1-p) = 12, i.e. 27.631 p - H(p) = 12:
    # at p = 0.45: 12.434 - 0.688 = 11.746 < 12; at p = 0.47: 12.987 - 0.691 = 12.296 > 12.
    p = 1.0 - score.risk
    assert 0.45 < p < 0.47
    assert kl_bernoulli(p, EPS) == pytest.approx(12.0, abs=1e-6)


def test_middle_case_refuses_although_the_bound_is_zero() -> None:
    # n = 4, m = 2. Full prompt 4/4 answer: y = answer, P(y) = 1. Skeletons answer 2/4 and 1/4.
    # Δ̄ = (ln 2 + ln 4) / 2 = 1.5 ln 2 = 1.039721; q̄ = 0.375; q_lo = max(0.25, 1/6) = 0.25.
    # B2T = 1.132848 (above); ISR = 1.039721 / 1.132848 = 0.9178 < 1 → REFUSE.
    # -ln q̄ = 0.980829 <= Δ̄, so p_max = 1 and the bound is 0: the gate uses the worst-case
    # prior q_lo, the bound the average q̄ (the toolkit's "two priors").
    config = HallucinationScoreConfig(n_samples=4, m=2)
    score = score_decisions(samples(4, 0), [samples(2, 2), samples(1, 3)], config)
    assert score.delta_bar == pytest.approx(1.5 * LN(2))
    assert (score.q_avg, score.q_lo) == (0.375, 0.25)
    assert score.isr == pytest.approx(1.039721 / 1.132848, abs=1e-6)
    assert score.decision == "REFUSE"
    assert score.risk == 0.0
    # A skeleton that never answers (0/4) clears both conditions:
    # Δ̄ = (ln 2 + min(ln 1 - ln EPS, 12)) / 2 = 6.346574; q_lo = max(0, 1/6) = 1/6;
    # B2T = 0.95 ln 5.7 + 0.05 ln 0.06 = 1.512779; ISR = 4.195 and Δ̄ >= B2T + 0.2.
    better = score_decisions(samples(4, 0), [samples(2, 2), samples(0, 4)], config)
    assert better.delta_bar == pytest.approx((LN(2) + 12.0) / 2)
    assert better.q_lo == pytest.approx(1 / 6)
    assert better.decision == "ANSWER"


def test_symmetric_mode_lowers_the_budget_when_a_skeleton_answers_more() -> None:
    # P(y=answer) = 3/4; skeletons answer 4/4 and 1/4 (see test_information_budget_one_sided...).
    one_sided = score_decisions(samples(3, 1), [samples(4, 0), samples(1, 3)], HallucinationScoreConfig(n_samples=4))
    symmetric = score_decisions(
        samples(3, 1), [samples(4, 0), samples(1, 3)], HallucinationScoreConfig(n_samples=4, clip_mode="symmetric")
    )
    assert one_sided.delta_bar == pytest.approx(LN(3) / 2)
    assert symmetric.delta_bar == pytest.approx(LN(1.5))


def test_realized_decision_is_the_majority_refuse_on_a_tie() -> None:
    assert realized_decision(samples(3, 2)) == "answer"
    assert realized_decision(samples(2, 2)) == "refuse"
    assert realized_decision(samples(1, 4)) == "refuse"
    # With y = refuse, S_k(y) counts refusals: P(y) = 2/4, skeleton refusals 4/4 → ln(0.5) < 0 → 0.
    score = score_decisions(samples(2, 2), [samples(0, 4)], HallucinationScoreConfig(n_samples=4, m=1))
    assert (score.y, score.p_y, score.s_y_list, score.delta_bar) == ("refuse", 0.5, (1.0,), 0.0)


def test_rationale_states_the_numbers_and_meta_has_haystacks_keys() -> None:
    config = HallucinationScoreConfig(n_samples=4, m=2)
    score = score_decisions(samples(4, 0), [samples(2, 2), samples(1, 3)], config)
    for part in (
        "REFUSE: ISR below its threshold",
        "Δ̄=1.0397 nats",
        "B2T=1.1328 nats",
        "ISR=0.918 (threshold 1.000)",
        "margin=0.200 nats",
        "q̄=0.375",
        "q_lo=0.250",
        "P(y)=1.000, y=answer",
        "h*=0.050",
        "EDFL RoH bound=0.000",
    ):
        assert part in score.rationale
    assert score.meta() == {
        "hallucination_decision": "REFUSE",
        "hallucination_risk": 0.0,
        "hallucination_rationale": score.rationale,
    }
    # With an ISR threshold of 0.5, ISR 0.918 passes but Δ̄ = 1.0397 < 1.1328 + 0.2 does not.
    lower_threshold = HallucinationScoreConfig(n_samples=4, m=2, isr_threshold=0.5)
    margin_only = score_decisions(samples(4, 0), [samples(2, 2), samples(1, 3)], lower_threshold)
    assert margin_only.rationale.startswith("REFUSE: Δ̄ below B2T + margin")
    answered = score_decisions(samples(7, 0), [samples(0, 7)] * 6, HallucinationScoreConfig())
    assert answered.rationale.startswith("ANSWER")
    assert "ISR=6.333" in answered.rationale


def test_scoring_without_samples_is_refused() -> None:
    config = HallucinationScoreConfig()
    with pytest.raises(ValueError, match="full prompt"):
        score_decisions([], [samples(1, 0)], config)
    with pytest.raises(ValueError, match="every skeleton"):
        score_decisions(samples(1, 0), [], config)
    with pytest.raises(ValueError, match="every skeleton"):
        score_decisions(samples(1, 0), [samples(1, 0), []], config)
