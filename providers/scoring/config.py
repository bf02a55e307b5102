"""The request option that asks for a hallucination risk score (``hallucination_score``).

The fields and their defaults are those of Haystack's experimental ``HallucinationScoreConfig``
(``haystack_experimental.utils.hallucination_risk_calculator.dataclasses``), itself the set of
knobs of the EDFL toolkit by Hassana Labs (``leochlon/hallbayes``). Cascade adds range checks
and a bound on how many decision samples one request may cost, since every sample is one model
call paid for by the producer and counted against the request's deadline.

Units: the toolkit computes every information quantity with natural logarithms, so
``margin_extra_bits`` and ``B_clip`` are in nats despite the historical "bits" in the name.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SkeletonPolicy = Literal["closed_book", "evidence_erase", "auto"]
ClipMode = Literal["one-sided", "symmetric"]

# Per-field caps, so an out-of-range value is refused with the field's own name.
MAX_N_SAMPLES = 64
MAX_M = 32
# Decision samples one scored request may draw: ``n_samples`` for the full prompt plus
# ``n_samples`` for each of the ``m`` skeletons, i.e. ``n_samples * (m + 1)``. The defaults
# (7, 6) cost 49; the cap keeps a request from asking for thousands of calls.
MAX_DECISION_SAMPLES = 256


class HallucinationScoreConfig(BaseModel):
    """How to estimate the EDFL hallucination risk of an answer.

    - ``skeleton_policy``: how the weakened prompts (skeletons, the "rolling priors") are made:
      ``closed_book`` masks entities, numbers and quoted spans; ``evidence_erase`` erases the
      evidence/context section; ``auto`` erases evidence when the prompt has a labelled evidence
      section and masks otherwise.
    - ``n_samples``: decision samples drawn per prompt (the full prompt and each skeleton).
    - ``m``: number of skeletons.
    - ``temperature``: sampling temperature of the decision calls.
    - ``h_star``: the target hallucination rate the decision is gated against.
    - ``isr_threshold``: the information sufficiency ratio needed to answer.
    - ``margin_extra_bits``: extra information (nats) required above the bits-to-trust.
    - ``B_clip``: the clip (nats) applied to each skeleton's log-ratio term.
    - ``clip_mode``: ``one-sided`` clips each term to ``[0, B_clip]``; ``symmetric`` to
      ``[-B_clip, B_clip]``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    skeleton_policy: SkeletonPolicy = "closed_book"
    n_samples: int = Field(default=7, ge=1, le=MAX_N_SAMPLES, strict=True)
    m: int = Field(default=6, ge=1, le=MAX_M, strict=True)
    temperature: float = Field(default=0.3, ge=0.0, le=2.0, strict=True, allow_inf_nan=False)
    h_star: float = Field(default=0.05, gt=0.0, lt=1.0, strict=True, allow_inf_nan=False)
    isr_threshold: float = Field(default=1.0, ge=0.0, strict=True, allow_inf_nan=False)
    margin_extra_bits: float = Field(default=0.2, ge=0.0, strict=True, allow_inf_nan=False)
    B_clip: float = Field(default=12.0, gt=0.0, strict=True, allow_inf_nan=False)
    clip_mode: ClipMode = "one-sided"

    @model_validator(mode="after")
    def _bounded_sampling(self) -> HallucinationScoreConfig:
        total = self.decision_samples
        if total > MAX_DECISION_SAMPLES:
            raise ValueError(
                f"n_samples * (m + 1) = {self.n_samples} * {self.m + 1} = {total} decision samples, "
                f"more than the {MAX_DECISION_SAMPLES} one request may draw: lower n_samples or m"
            )
        return self

    @property
    def decision_samples(self) -> int:
        """Decision samples a scored request draws: ``n_samples * (m + 1)``."""
        return self.n_samples * (self.m + 1)
