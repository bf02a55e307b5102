"""``HallucinationScoreConfig``: Haystack's defaults, range checks naming the field, the sampling cap."""

from __future__ import annotations

import math
from typing import Any

import pytest
from pydantic import ValidationError

from providers.scoring import MAX_DECISION_SAMPLES, MAX_M, MAX_N_SAMPLES, HallucinationScoreConfig


def test_defaults_are_haystacks() -> None:
    config = HallucinationScoreConfig()
    assert config.model_dump() == {
        "skeleton_policy": "closed_book",
        "n_samples": 7,
        "m": 6,
        "temperature": 0.3,
        "h_star": 0.05,
        "isr_threshold": 1.0,
        "margin_extra_bits": 0.2,
        "B_clip": 12.0,
        "clip_mode": "one-sided",
    }
    assert config.decision_samples == 7 * (6 + 1)


def test_accepts_every_policy_and_clip_mode_from_json() -> None:
    for policy in ("closed_book", "evidence_erase", "auto"):
        for mode in ("one-sided", "symmetric"):
            config = HallucinationScoreConfig.model_validate_json(
                f'{{"skeleton_policy": "{policy}", "clip_mode": "{mode}", "B_clip": 5, "h_star": 0.1}}'
            )
            assert (config.skeleton_policy, config.clip_mode) == (policy, mode)
            assert config.B_clip == 5.0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("h_star", 0.0),
        ("h_star", 1.0),
        ("h_star", -0.1),
        ("h_star", math.nan),
        ("n_samples", 0),
        ("n_samples", MAX_N_SAMPLES + 1),
        ("n_samples", True),
        ("n_samples", 2.5),
        ("n_samples", "7"),
        ("m", 0),
        ("m", MAX_M + 1),
        ("temperature", -0.01),
        ("temperature", 2.01),
        ("temperature", math.inf),
        ("isr_threshold", -1.0),
        ("margin_extra_bits", -0.2),
        ("B_clip", 0.0),
        ("B_clip", -12.0),
        ("B_clip", math.inf),
        ("clip_mode", "two-sided"),
        ("skeleton_policy", "open_book"),
    ],
)
def test_out_of_range_value_is_refused_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        HallucinationScoreConfig(**{field: value})
    errors = caught.value.errors()
    assert [error["loc"] for error in errors] == [(field,)]
    assert field in str(caught.value)


def test_unknown_field_is_refused() -> None:
    with pytest.raises(ValidationError) as caught:
        HallucinationScoreConfig.model_validate({"q_floor": 0.1})
    assert caught.value.errors()[0]["loc"] == ("q_floor",)
    assert caught.value.errors()[0]["type"] == "extra_forbidden"


def test_sampling_is_bounded_by_n_samples_times_m_plus_one() -> None:
    # 32 * (7 + 1) = 256 = MAX_DECISION_SAMPLES: allowed; 32 * (8 + 1) = 288: refused.
    assert MAX_DECISION_SAMPLES == 256
    assert HallucinationScoreConfig(n_samples=32, m=7).decision_samples == 256
    with pytest.raises(ValidationError) as caught:
        HallucinationScoreConfig(n_samples=32, m=8)
    message = str(caught.value)
    assert "n_samples * (m + 1) = 32 * 9 = 288" in message
    assert str(MAX_DECISION_SAMPLES) in message


def test_config_is_frozen() -> None:
    config = HallucinationScoreConfig()
    with pytest.raises(ValidationError):
        config.n_samples = 3
