"""Hallucination risk scoring: the pure part (config, EDFL mathematics, skeletons, decisions).

Nothing here calls a provider or touches Redis: given the decisions sampled on the full prompt
and on its skeletons, ``score_decisions`` returns the EDFL risk bound, the ANSWER/REFUSE gate
and a rationale. See ``edfl`` for the formulas and their sources.
"""

from providers.scoring.config import (
    MAX_DECISION_SAMPLES,
    MAX_M,
    MAX_N_SAMPLES,
    ClipMode,
    HallucinationScoreConfig,
    SkeletonPolicy,
)
from providers.scoring.decisions import DECISION_MAX_TOKENS, DecisionMessage, decision_messages, parse_decision
from providers.scoring.edfl import (
    EPS,
    DecisionLabel,
    HallucinationScore,
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
from providers.scoring.skeletons import MASK_LEVELS, MASK_TOKEN, Skeletons, build_skeletons, erase_evidence

__all__ = [
    "DECISION_MAX_TOKENS",
    "EPS",
    "MASK_LEVELS",
    "MASK_TOKEN",
    "MAX_DECISION_SAMPLES",
    "MAX_M",
    "MAX_N_SAMPLES",
    "ClipMode",
    "DecisionLabel",
    "DecisionMessage",
    "HallucinationScore",
    "HallucinationScoreConfig",
    "SkeletonPolicy",
    "Skeletons",
    "bits_to_trust",
    "build_skeletons",
    "decision_messages",
    "erase_evidence",
    "information_budget",
    "information_sufficiency_ratio",
    "kl_bernoulli",
    "laplace_floor",
    "p_max_edfl",
    "parse_decision",
    "realized_decision",
    "roh_bound",
    "score_decisions",
    "should_answer",
]
