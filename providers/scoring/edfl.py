"""The EDFL risk bound and the answer/refuse gate, from answer/refuse decision samples.

Notation (Chlon et al., "LLMs are Bayesian, in Expectation, not in Realization",
arXiv 2507.11768, and its follow-up "Predictable Compression Failures", arXiv 2509.11208, where
the Expectation-level Decompression Law and the B2T/ISR/RoH planners are stated), as in the
reference toolkit ``leochlon/hallbayes``:

- ``P`` is the model on the full prompt, ``S_1 .. S_m`` the model on the ``m`` skeletons
  (weakened prompts, the "rolling priors"). Each is estimated from ``n`` sampled decisions.
- ``y`` is the realized decision on the full prompt; ``A`` the event "the model answers".
- ``q_k = S_k(A)``; ``q̄ = (1/m) Σ_k q_k``; ``q_lo = max(min_k q_k, 1/(n+2))`` (the worst-case
  prior with the Laplace floor, so that a prior of 0 does not make trust unreachable).
- Information budget: ``Δ̄ = (1/m) Σ_k clip(ln P(y) - ln S_k(y), B)``, with ``clip`` to
  ``[0, B]`` (one-sided) or ``[-B, B]`` (symmetric).
- EDFL: ``KL(Ber(p) || Ber(q̄)) <= Δ̄`` for the reliability ``p``; so
  ``p <= p_max(Δ̄, q̄) = max{p >= q̄ : KL(Ber(p) || Ber(q̄)) <= Δ̄}`` and the risk of
  hallucination is bounded by ``RoH <= 1 - p_max(Δ̄, q̄)``.
- Bits-to-trust: ``B2T = KL(Ber(1 - h*) || Ber(q_lo))``, the information needed to lift the
  worst-case prior to the target reliability ``1 - h*``.
- Information sufficiency ratio: ``ISR = Δ̄ / B2T``.
- Gate: answer iff ``ISR >= isr_threshold`` and ``Δ̄ >= B2T + margin``.

All logarithms are natural: every quantity is in nats (the toolkit's "bits" are nats too).
Probabilities are clamped to ``[EPS, 1 - EPS]`` before a logarithm, so a skeleton that never
produces ``y`` contributes ``ln P(y) - ln EPS`` (about 27.6 nats) before clipping.

One choice differs from the toolkit: it takes ``y`` to be the first sampled decision, which
depends on the order replies arrive in; here ``y`` is the majority of the samples, ``refuse`` on
a tie, so the same samples always give the same score.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from providers.scoring.config import ClipMode, HallucinationScoreConfig

EPS = 1e-12
# Bisection steps for p_max: each halves an interval inside [0, 1], so 200 steps reach the
# resolution of a double long before the end.
_BISECTION_STEPS = 200

DecisionLabel = Literal["answer", "refuse"]


def clamp_probability(x: float) -> float:
    """``x`` clamped to ``[EPS, 1 - EPS]``, so its logarithm and that of ``1 - x`` are finite."""
    return min(1.0 - EPS, max(EPS, x))


def kl_bernoulli(p: float, q: float) -> float:
    """``KL(Ber(p) || Ber(q)) = p ln(p/q) + (1-p) ln((1-p)/(1-q))`` in nats.

    ``p`` is taken as given (``0 ln 0 = 0``); ``q`` and ``1 - q`` are floored at ``EPS``, so the
    value is finite for every ``p, q`` in ``[0, 1]``.
    """
    # The complement is clamped on its own (not computed as 1 - clamp(q)), so q = 1 gives
    # 1 - q = EPS exactly rather than EPS plus a rounding error of 1 - (1 - EPS).
    q_yes = max(EPS, min(1.0, q))
    q_no = max(EPS, min(1.0, 1.0 - q))
    total = 0.0
    if p > 0.0:
        total += p * math.log(p / q_yes)
    if p < 1.0:
        total += (1.0 - p) * math.log((1.0 - p) / q_no)
    return max(0.0, total)


def p_max_edfl(delta: float, q: float) -> float:
    """The largest reliability the budget allows: ``max{p >= q : KL(Ber(p) || Ber(q)) <= delta}``.

    ``KL(Ber(p) || Ber(q))`` grows with ``p`` on ``[q, 1]`` and reaches ``-ln q`` at ``p = 1``,
    so the answer is ``1`` when ``delta >= -ln q`` and otherwise found by bisection.
    """
    q = clamp_probability(q)
    delta = max(0.0, delta)
    if kl_bernoulli(1.0, q) <= delta:
        return 1.0
    lo, hi = q, 1.0
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if kl_bernoulli(mid, q) <= delta:
            lo = mid
        else:
            hi = mid
    return lo


def roh_bound(delta_bar: float, q_avg: float) -> float:
    """The EDFL bound on the risk of hallucination: ``RoH <= 1 - p_max(Δ̄, q̄)``."""
    return max(0.0, 1.0 - p_max_edfl(delta_bar, q_avg))


def clip_term(u: float, b_clip: float, clip_mode: ClipMode) -> float:
    """One skeleton's term ``u = ln P(y) - ln S_k(y)`` clipped to ``[0, B]`` or ``[-B, B]``."""
    low = 0.0 if clip_mode == "one-sided" else -b_clip
    return min(b_clip, max(low, u))


def information_budget(p_y: float, s_y: Sequence[float], b_clip: float, clip_mode: ClipMode) -> float:
    """``Δ̄ = (1/m) Σ_k clip(ln P(y) - ln S_k(y), B)`` in nats."""
    if not s_y:
        raise ValueError("the information budget needs at least one skeleton")
    log_p = math.log(clamp_probability(p_y))
    terms = [clip_term(log_p - math.log(clamp_probability(s)), b_clip, clip_mode) for s in s_y]
    return sum(terms) / len(terms)


def bits_to_trust(q_lo: float, h_star: float) -> float:
    """``B2T = KL(Ber(1 - h*) || Ber(q_lo))`` in nats."""
    return kl_bernoulli(1.0 - h_star, q_lo)


def information_sufficiency_ratio(delta_bar: float, b2t: float) -> float:
    """``ISR = Δ̄ / B2T``; with ``B2T = 0`` it is ``inf`` when ``Δ̄ > 0`` and ``1`` otherwise."""
    if b2t <= 0.0:
        return math.inf if delta_bar > 0.0 else 1.0
    return delta_bar / b2t


def laplace_floor(n_samples: int) -> float:
    """The floor ``1/(n+2)`` put under ``q_lo``: the Laplace estimate of zero answers in ``n``."""
    return 1.0 / (n_samples + 2)


def should_answer(delta_bar: float, b2t: float, isr_threshold: float, margin: float) -> bool:
    """The gate: ``ISR >= isr_threshold`` and ``Δ̄ >= B2T + margin``."""
    isr = information_sufficiency_ratio(delta_bar, b2t)
    return isr >= isr_threshold and delta_bar >= b2t + max(0.0, margin)


@dataclass(frozen=True)
class HallucinationScore:
    """The numbers of one scored answer, and the decision they lead to."""

    answer: bool
    risk: float  # the EDFL RoH bound, 0..1
    delta_bar: float  # Δ̄, nats
    b2t: float  # nats
    isr: float
    q_avg: float  # q̄
    q_lo: float  # worst-case prior after the Laplace floor
    p_y: float  # P(y), the full prompt's frequency of its realized decision
    y: DecisionLabel
    q_list: tuple[float, ...]  # q_k per skeleton
    s_y_list: tuple[float, ...]  # S_k(y) per skeleton
    rationale: str

    @property
    def decision(self) -> Literal["ANSWER", "REFUSE"]:
        """``ANSWER`` or ``REFUSE``, as Haystack spells ``hallucination_decision``."""
        return "ANSWER" if self.answer else "REFUSE"

    def meta(self) -> dict[str, str | float]:
        """The three reply-meta keys of Haystack's scored generator."""
        return {
            "hallucination_decision": self.decision,
            "hallucination_risk": self.risk,
            "hallucination_rationale": self.rationale,
        }


def realized_decision(samples: Sequence[DecisionLabel]) -> DecisionLabel:
    """The full prompt's realized decision ``y``: the majority of its samples, ``refuse`` on a tie.

    A tie goes to ``refuse`` because that is the cautious reading of an undecided model.
    """
    answers = sum(1 for s in samples if s == "answer")
    return "answer" if answers * 2 > len(samples) else "refuse"


def _frequency(samples: Sequence[DecisionLabel], label: DecisionLabel) -> float:
    return sum(1 for s in samples if s == label) / len(samples)


def _format_ratio(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.3f}"


def rationale_text(score: HallucinationScore, config: HallucinationScoreConfig) -> str:
    """A one-line account of the numbers behind the decision."""
    if score.answer:
        why = "ANSWER: the information budget covers the bits-to-trust"
    elif information_sufficiency_ratio(score.delta_bar, score.b2t) < config.isr_threshold:
        why = "REFUSE: ISR below its threshold"
    else:
        why = "REFUSE: Δ̄ below B2T + margin"
    return (
        f"{why}; Δ̄={score.delta_bar:.4f} nats, B2T={score.b2t:.4f} nats, "
        f"ISR={_format_ratio(score.isr)} (threshold {config.isr_threshold:.3f}), "
        f"margin={config.margin_extra_bits:.3f} nats; q̄={score.q_avg:.3f}, q_lo={score.q_lo:.3f}, "
        f"P(y)={score.p_y:.3f}, y={score.y}; h*={config.h_star:.3f}; "
        f"EDFL RoH bound={score.risk:.3f}"
    )


def score_decisions(
    posterior: Sequence[DecisionLabel],
    skeletons: Sequence[Sequence[DecisionLabel]],
    config: HallucinationScoreConfig,
) -> HallucinationScore:
    """Score one answer from its decision samples.

    ``posterior`` holds the decisions sampled on the full prompt; ``skeletons`` one sequence of
    sampled decisions per skeleton. ``n`` in the Laplace floor is ``config.n_samples``.
    """
    if not posterior:
        raise ValueError("no decision samples for the full prompt")
    if not skeletons or any(not samples for samples in skeletons):
        raise ValueError("every skeleton needs at least one decision sample")
    y = realized_decision(posterior)
    p_y = _frequency(posterior, y)
    q_list = tuple(_frequency(samples, "answer") for samples in skeletons)
    s_y_list = tuple(_frequency(samples, y) for samples in skeletons)
    q_avg = sum(q_list) / len(q_list)
    q_lo = max(min(q_list), laplace_floor(config.n_samples))
    delta_bar = information_budget(p_y, s_y_list, config.B_clip, config.clip_mode)
    b2t = bits_to_trust(q_lo, config.h_star)
    score = HallucinationScore(
        answer=should_answer(delta_bar, b2t, config.isr_threshold, config.margin_extra_bits),
        risk=roh_bound(delta_bar, q_avg),
        delta_bar=delta_bar,
        b2t=b2t,
        isr=information_sufficiency_ratio(delta_bar, b2t),
        q_avg=q_avg,
        q_lo=q_lo,
        p_y=p_y,
        y=y,
        q_list=q_list,
        s_y_list=s_y_list,
        rationale="",
    )
    return replace(score, rationale=rationale_text(score, config))
