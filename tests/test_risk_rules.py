"""inference.py: the seed's risk rule at its boundaries and the normalised entropy (uncertainty)."""

from __future__ import annotations

import math

import pytest
import torch

from pneumoscan.inference import (
    RISK_HIGH,
    RISK_LOW,
    RISK_MEDIUM,
    normalized_entropy,
    risk_level,
    unvalidated_kind,
)
from pneumoscan.scope_report import _flag_reason

EPS = 1e-9

# LOW if confidence > 0.8 and uncertainty < 0.3; MEDIUM if confidence > 0.6 and uncertainty < 0.5; else HIGH.
RISK_TABLE = [
    (0.99, 0.0, RISK_LOW),
    (0.8 + EPS, 0.3 - EPS, RISK_LOW),
    (0.8, 0.1, RISK_MEDIUM),  # confidence must be strictly above 0.8
    (0.8 + EPS, 0.3, RISK_MEDIUM),  # uncertainty must be strictly below 0.3
    (0.9, 0.3 + EPS, RISK_MEDIUM),
    (0.8 - EPS, 0.29, RISK_MEDIUM),
    (0.6 + EPS, 0.5 - EPS, RISK_MEDIUM),
    (0.6, 0.1, RISK_HIGH),  # confidence must be strictly above 0.6
    (0.6 + EPS, 0.5, RISK_HIGH),  # uncertainty must be strictly below 0.5
    (0.95, 0.5, RISK_HIGH),
    (0.95, 0.5 + EPS, RISK_HIGH),
    (0.6 - EPS, 0.0, RISK_HIGH),
    (0.5, 1.0, RISK_HIGH),
    (1.0, 1.0, RISK_HIGH),
    (0.0, 0.0, RISK_HIGH),
]


@pytest.mark.parametrize(("confidence", "uncertainty", "expected"), RISK_TABLE,
                         ids=[f"c={c!r}-u={u!r}" for c, u, _ in RISK_TABLE])
def test_risk_level(confidence, uncertainty, expected):
    assert risk_level(confidence, uncertainty) == expected


def reference_entropy(p: float) -> float:
    def plogp(x: float) -> float:
        return x * math.log(x) if x > 0 else 0.0

    return -(plogp(p) + plogp(1 - p)) / math.log(2)


@pytest.mark.parametrize("p", [0.0, 1e-12, 0.01, 0.1, 0.25, 0.3, 0.5, 0.7, 0.9, 0.999, 1.0])
def test_normalized_entropy_two_classes(p):
    value = normalized_entropy([p, 1 - p])
    assert value == pytest.approx(reference_entropy(p), abs=1e-12)
    assert 0.0 <= value <= 1.0 + 1e-12
    assert not math.isnan(value)


def test_normalized_entropy_special_values():
    assert normalized_entropy([0.5, 0.5]) == pytest.approx(1.0)
    assert normalized_entropy([0.0, 1.0]) == 0.0
    assert normalized_entropy([1.0, 0.0]) == 0.0
    assert normalized_entropy(torch.tensor([0.2, 0.8], dtype=torch.float64)) == pytest.approx(reference_entropy(0.2))
    assert normalized_entropy([1 / 3, 1 / 3, 1 / 3]) == pytest.approx(1.0)


def test_entropy_is_symmetric_and_peaks_at_one_half():
    values = [normalized_entropy([p, 1 - p]) for p in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)]
    assert values == sorted(values, reverse=True)
    assert normalized_entropy([0.3, 0.7]) == pytest.approx(normalized_entropy([0.7, 0.3]))


def test_two_class_results_reach_every_risk_level():
    """With two classes the uncertainty follows from the confidence; all three levels are reachable."""
    levels = {risk_level(c, normalized_entropy([c, 1 - c])) for c in (0.7, 0.92, 0.99)}
    assert levels == {RISK_LOW, RISK_MEDIUM, RISK_HIGH}


def test_a_certain_answer_has_uncertainty_zero_not_minus_zero():
    u = normalized_entropy([1.0, 0.0])
    assert u == 0.0 and math.copysign(1.0, u) == 1.0  # JSON wrote -0.0


@pytest.mark.parametrize(("warnings", "kind"), [
    ([], None),
    (["low detail: 40 % of the training films' fine detail"], None),
    (["looks like a lateral view; the model is validated on frontal films"], "view"),
    (["Projection LL: not frontal"], "view"),
    (["looks like an adult's film: outside the validated population (children aged 1-5)"], "population"),
    (["outside the validated population", "looks like a LATERAL view"], "view"),
    # a marker is read inside one warning, never across two joined ones
    (["the film is not", "frontal-ish"], None),
])
def test_unvalidated_kind_reads_each_warning(warnings, kind):
    """The kind that forces risk HIGH (inference) is the one the scope report counts it under."""
    assert unvalidated_kind(warnings) == kind
    assert (_flag_reason(warnings) is None) == (kind is None)
    if kind:
        assert _flag_reason(warnings).startswith(kind)
