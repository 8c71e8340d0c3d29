"""metrics.py against scikit-learn, NaN on empty denominators, bootstrap CIs, threshold choice, ECE."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from pneumoscan.metrics import (
    METRIC_NAMES,
    auroc,
    binary_metrics,
    bootstrap_ci,
    confusion,
    expected_calibration_error,
    metrics_with_ci,
    reliability_bins,
    threshold_for_sensitivity,
)

RNG = np.random.default_rng(20240601)
Y = RNG.integers(0, 2, size=400)
# scores with many ties (21 distinct values), mildly informative
P_TIED = np.clip(np.round((RNG.random(400) * 0.7 + 0.3 * Y) * 20) / 20, 0, 1)
P_CONT = np.clip(RNG.normal(0.4 + 0.2 * Y, 0.2), 0, 1)


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12)


def sklearn_metrics(y, prob, threshold) -> dict[str, float]:
    pred = (np.asarray(prob) >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    nan = float("nan")
    return {
        "accuracy": accuracy_score(y, pred),
        "sensitivity": recall_score(y, pred, zero_division=np.nan),
        "specificity": tn / (tn + fp) if tn + fp else nan,
        "ppv": precision_score(y, pred, zero_division=np.nan),
        "npv": tn / (tn + fn) if tn + fn else nan,
        "f1": f1_score(y, pred, zero_division=np.nan),
        "auroc": roc_auc_score(y, prob),
    }


@pytest.mark.parametrize("scores", ["tied", "continuous"])
@pytest.mark.parametrize("threshold", [0.0, 0.05, 0.3, 0.5, 0.55, 0.7, 0.95, 1.0, 1.01])
def test_binary_metrics_match_sklearn(scores, threshold):
    prob = P_TIED if scores == "tied" else P_CONT
    ours = binary_metrics(Y, prob, threshold)
    theirs = sklearn_metrics(Y, prob, threshold)
    assert set(ours) == set(METRIC_NAMES)
    for name in METRIC_NAMES:
        assert same(ours[name], float(theirs[name])), f"{name}: {ours[name]} != sklearn {theirs[name]}"


def test_threshold_is_inclusive():
    assert binary_metrics(np.array([1, 0]), np.array([0.5, 0.49]), 0.5)["accuracy"] == 1.0
    assert confusion(np.array([1, 0]), np.array([0.5, 0.5]), 0.5) == {"tp": 1, "fp": 1, "tn": 0, "fn": 0}


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 150)
    s = rng.integers(0, 6, 150) / 5.0
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auroc_extremes():
    y = np.array([0, 0, 1, 1])
    assert auroc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert auroc(y, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert auroc(y, np.full(4, 0.3)) == 0.5


def test_nan_when_a_denominator_is_zero():
    only_negatives = binary_metrics(np.zeros(5, int), np.linspace(0.1, 0.9, 5), 0.5)
    assert math.isnan(only_negatives["sensitivity"]) and math.isnan(only_negatives["auroc"])
    assert only_negatives["specificity"] == pytest.approx(2 / 5)  # 0.5, 0.7, 0.9 called positive

    only_positives = binary_metrics(np.ones(5, int), np.linspace(0.1, 0.9, 5), 0.5)
    assert math.isnan(only_positives["specificity"]) and math.isnan(only_positives["auroc"])
    assert only_positives["sensitivity"] == pytest.approx(3 / 5)

    y = np.array([0, 1, 0, 1])
    none_called = binary_metrics(y, np.array([0.1, 0.2, 0.3, 0.4]), 0.9)
    assert math.isnan(none_called["ppv"]) and none_called["npv"] == 0.5 and none_called["sensitivity"] == 0.0
    all_called = binary_metrics(y, np.array([0.1, 0.2, 0.3, 0.4]), 0.0)
    assert math.isnan(all_called["npv"]) and all_called["ppv"] == 0.5 and all_called["specificity"] == 0.0

    empty = binary_metrics(np.array([], int), np.array([], float), 0.5)
    assert all(math.isnan(v) for v in empty.values())


def test_bootstrap_ci_contains_the_point_estimate_and_is_reproducible():
    point = binary_metrics(Y, P_CONT, 0.5)
    ci = bootstrap_ci(Y, P_CONT, 0.5, n_boot=300, seed=11)
    assert set(ci) == set(METRIC_NAMES)
    for name, (lo, hi) in ci.items():
        assert lo <= point[name] <= hi, f"{name}: {point[name]} outside [{lo}, {hi}]"
        assert hi - lo > 0
    assert bootstrap_ci(Y, P_CONT, 0.5, n_boot=300, seed=11) == ci
    assert bootstrap_ci(Y, P_CONT, 0.5, n_boot=300, seed=12) != ci


def test_patient_bootstrap_is_wider_when_images_of_a_patient_are_copies():
    rng = np.random.default_rng(5)
    y0 = rng.integers(0, 2, 80)
    p0 = np.clip(rng.normal(0.35 + 0.3 * y0, 0.2), 0, 1)
    y, p = np.repeat(y0, 5), np.repeat(p0, 5)  # 5 identical images per patient
    groups = np.repeat(np.arange(80), 5)
    by_image = bootstrap_ci(y, p, 0.5, n_boot=400, seed=1)
    by_patient = bootstrap_ci(y, p, 0.5, n_boot=400, seed=1, groups=groups)
    point = binary_metrics(y, p, 0.5)
    for name in ("accuracy", "auroc"):
        lo, hi = by_patient[name]
        assert lo <= point[name] <= hi
        assert hi - lo > 1.5 * (by_image[name][1] - by_image[name][0]), name


def test_metrics_with_ci_report():
    report = metrics_with_ci(Y, P_CONT, 0.4, n_boot=50, seed=0)
    assert report["n"] == len(Y) and report["n_positive"] == int(Y.sum())
    assert report["threshold"] == 0.4
    assert sum(report["confusion"].values()) == len(Y)
    point = binary_metrics(Y, P_CONT, 0.4)
    for name in METRIC_NAMES:
        m = report["metrics"][name]
        assert m["value"] == point[name]
        assert m["ci_low"] <= m["value"] <= m["ci_high"]


def _sensitivity(y, prob, t):
    return binary_metrics(y, prob, t)["sensitivity"]


@pytest.mark.parametrize("target", [0.5, 0.55, 0.56, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0])
@pytest.mark.parametrize("n_pos", [25, 37, 100])
def test_threshold_for_sensitivity_is_the_highest_meeting_the_target(target, n_pos):
    rng = np.random.default_rng(n_pos)
    y = np.concatenate([np.ones(n_pos, int), np.zeros(60, int)])
    prob = rng.random(len(y))  # distinct values
    t = threshold_for_sensitivity(y, prob, target)
    _assert_best_threshold_with_margin(y, prob, t, target)


def _assert_best_threshold_with_margin(y, prob, t, target):
    assert _sensitivity(y, prob, t) >= target
    highest = prob[prob >= t].min()  # the case the threshold sits just below
    assert t < highest, "the threshold must not sit on a data point"
    assert not ((prob >= t) & (prob < highest)).any(), "it must classify the data as the highest threshold does"
    assert _sensitivity(y, prob, np.nextafter(highest, np.inf)) < target, "a higher threshold also meets the target"
    below = prob[prob < t]
    if len(below):
        assert t - below.max() == pytest.approx(highest - t), "the threshold is midway between two cases"


@pytest.mark.parametrize("target", [0.6, 0.8, 0.95])
def test_threshold_for_sensitivity_with_tied_scores(target):
    t = threshold_for_sensitivity(Y, P_TIED, target)
    _assert_best_threshold_with_margin(Y, P_TIED, t, target)


def test_threshold_for_sensitivity_needs_positives():
    with pytest.raises(ValueError, match="positive"):
        threshold_for_sensitivity(np.zeros(4, int), np.linspace(0, 1, 4), 0.9)


def test_ece_is_zero_for_perfectly_calibrated_bins():
    # 10 cases at 0.8, 8 of them positive; 10 cases at 0.3, 3 of them positive:
    # each bin's accuracy equals its confidence (0.8 and 0.7).
    prob = np.array([0.8] * 10 + [0.3] * 10)
    y = np.array([1] * 8 + [0] * 2 + [1] * 3 + [0] * 7)
    assert expected_calibration_error(y, prob, n_bins=10) == pytest.approx(0.0, abs=1e-12)


def test_ece_matches_a_hand_computation():
    prob = np.array([0.9, 0.9, 0.65, 0.3])
    y = np.array([1, 0, 1, 0])
    # confidences of the predicted class: 0.9, 0.9, 0.65, 0.7; correct: 1, 0, 1, 1
    # 5 bins: (0.6, 0.8] holds 0.65 and 0.7 -> accuracy 1, confidence 0.675 -> |gap| 0.325 x 2
    #         (0.8, 1.0] holds 0.9 and 0.9  -> accuracy 0.5, confidence 0.9 -> |gap| 0.4 x 2
    expected = (2 * 0.325 + 2 * 0.4) / 4
    assert expected_calibration_error(y, prob, n_bins=5) == pytest.approx(expected)
    bins = reliability_bins(y, prob, n_bins=5)
    assert [b["count"] for b in bins] == [0, 0, 0, 2, 2]
    assert bins[3]["confidence"] == pytest.approx(0.675) and bins[3]["accuracy"] == 1.0
    assert bins[4]["confidence"] == pytest.approx(0.9) and bins[4]["accuracy"] == 0.5


def test_reliability_bins_cover_every_case():
    bins = reliability_bins(Y, P_CONT, 15)
    assert len(bins) == 15 and sum(b["count"] for b in bins) == len(Y)


def test_the_wilson_interval_stays_within_0_and_1():
    from pneumoscan.metrics import wilson_interval

    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0  # never -0.000 in a report
    lo, hi = wilson_interval(8, 10)
    assert 0.49 < lo < 0.8 < hi < 0.95
    assert all(map(math.isnan, wilson_interval(0, 0)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_score_that_is_not_finite_is_refused_not_counted(bad):
    from pneumoscan.metrics import auroc, binary_metrics, confusion, expected_calibration_error

    y, p = np.array([1, 1, 1, 0, 0, 0]), np.array([0.9, 0.8, bad, 0.1, 0.2, 0.3])
    # before: a NaN counted as a missed pneumonia, ranked highest by the AUROC and dropped from the ECE
    for compute in (lambda: auroc(y, p), lambda: confusion(y, p, 0.5), lambda: binary_metrics(y, p),
                    lambda: expected_calibration_error(y, p), lambda: threshold_for_sensitivity(y, p, 0.95)):
        with pytest.raises(ValueError, match="1 of 6 .* are NaN or infinite"):
            compute()


def test_the_ece_of_no_films_is_nan_not_a_crash():
    from pneumoscan.metrics import expected_calibration_error

    assert np.isnan(expected_calibration_error(np.array([]), np.array([])))


def _binary_logits(z: np.ndarray):
    import torch

    return torch.tensor(np.stack([np.zeros(len(z)), z], 1))


@pytest.mark.parametrize("scale", [0.3, 1.0, 10.0])
def test_temperature_and_logistic_calibration_match_sklearn(scale):
    """Temperature scaling is a logistic regression on the margin z1 - z0 without an intercept (T = 1 / coef);
    the logistic calibration is the same with one. LBFGS's default tolerances stopped 2e-4 (relative) short."""
    import torch
    from sklearn.linear_model import LogisticRegression

    from pneumoscan.calibration import fit_logistic, fit_temperature

    rng = np.random.default_rng(int(scale * 10))
    y = rng.integers(0, 2, 400)
    z = (rng.normal(size=400) + 1.5 * (2 * y - 1) + 0.4) * scale
    labels = torch.tensor(y)
    plain = LogisticRegression(fit_intercept=False, C=1e12, tol=1e-12, max_iter=10_000).fit(z[:, None], y)
    assert fit_temperature(_binary_logits(z), labels) == pytest.approx(1 / plain.coef_[0, 0], rel=1e-6)
    full = LogisticRegression(C=1e12, tol=1e-12, max_iter=10_000).fit(z[:, None], y)
    t, b = fit_logistic(_binary_logits(z), labels)
    assert t == pytest.approx(1 / full.coef_[0, 0], rel=1e-6) and b == pytest.approx(full.intercept_[0], abs=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_calibration_is_not_fitted_on_logits_that_are_not_finite(bad):
    """Before, a NaN or infinite logit gave a NaN temperature, silently, and every probability after it NaN."""
    import torch

    from pneumoscan.calibration import fit_logistic, fit_temperature

    z = np.array([-2.0, -1.0, 0.5, 1.0, bad, 2.0])
    labels = torch.tensor([0, 0, 1, 0, 1, 1])
    for fit in (fit_temperature, fit_logistic):
        with pytest.raises(ValueError, match="1 of 6 films have NaN or infinite logits"):
            fit(_binary_logits(z), labels)


@pytest.mark.parametrize("case, bound", [("uninformative", 20.0), ("reversed", 20.0), ("separated", 0.05)])
def test_a_temperature_clamped_to_its_bounds_says_so(case, bound, caplog):
    """A temperature that ran to a bound is no optimum of the likelihood; it was clamped without a word."""
    import torch

    from pneumoscan.calibration import fit_temperature

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    z = {"uninformative": rng.normal(0, 50, 200), "reversed": -(rng.normal(size=200) + 2 * (2 * y - 1)),
         "separated": (2 * y - 1) * rng.uniform(0.5, 3, 200)}[case]
    assert fit_temperature(_binary_logits(z), torch.tensor(y)) == bound
    assert f"outside [0.05, 20] and was set to {bound:g}" in caplog.text
    caplog.clear()
    fit_temperature(_binary_logits(rng.normal(size=200) + 2 * (2 * y - 1)), torch.tensor(y))
    assert "outside" not in caplog.text  # a temperature within the bounds: no warning


def test_a_logistic_calibration_at_its_temperature_bound_refits_the_intercept(caplog):
    """Uninformative margins far from 0: the slope runs towards 0 (T to infinity) and the intercept to the log-odds
    of the share of pneumonia. T was clamped to 20 and the intercept kept, so every probability was shifted by
    z / 20 (about 2.5 logits here): mean P(PNEUMONIA) 0.9 for a share of 0.27. Now the intercept is fitted for
    T = 20, as a one-parameter fit (scipy) finds it."""
    import torch
    from scipy.optimize import minimize_scalar

    from pneumoscan.calibration import fit_logistic, positive_probability

    rng = np.random.default_rng(3)
    y = (rng.random(300) < 0.3).astype(int)
    z = 50 + rng.normal(0, 50, 300)
    logits = _binary_logits(z)
    t, b = fit_logistic(logits, torch.tensor(y))
    assert t == 20.0 and "logistic calibration: the fitted temperature" in caplog.text
    best = minimize_scalar(lambda c: np.mean(np.logaddexp(0, z / t + c) - y * (z / t + c))).x
    assert b == pytest.approx(best, abs=1e-3)
    assert positive_probability(logits, t, b).mean() == pytest.approx(y.mean(), abs=0.01)


def test_the_ece_refuses_scores_that_are_not_probabilities():
    """A score above 1 or below 0 (a logit passed by mistake) has a confidence outside every bin: the film fell out
    of the ECE silently (here 2 of 4 films counted, ECE 0.1)."""
    y = np.array([1, 0, 1, 0])
    for compute in (expected_calibration_error, reliability_bins):
        with pytest.raises(ValueError, match="2 of 4 probabilities are outside"):
            compute(y, np.array([1.3, -0.2, 0.9, 0.1]))
    # 0 and 1 themselves are probabilities: each counted, in the top bin (confidence 1)
    bins = reliability_bins(y, np.array([1.0, 0.0, 0.0, 1.0]))
    assert bins[-1]["count"] == 4 and bins[-1]["accuracy"] == 0.5
    assert expected_calibration_error(y, np.array([1.0, 0.0, 0.0, 1.0])) == pytest.approx(0.5)


@pytest.mark.parametrize("n_groups", [60, 101])
def test_patient_bootstrap_refuses_groups_that_do_not_match_the_films(n_groups):
    """60 patient ids for 100 films: only the first 60 films (mostly normal) were ever resampled, and the
    sensitivity's CI came out [0, 0.33] around a point estimate of 0.83."""
    y = np.r_[np.zeros(50), np.ones(50)].astype(int)
    p = np.r_[np.linspace(0, 0.6, 50), np.linspace(0.4, 1, 50)]
    with pytest.raises(ValueError, match=f"{n_groups} groups for 100 films"):
        metrics_with_ci(y, p, 0.5, n_boot=20, groups=list(range(n_groups)))
    lo, hi = bootstrap_ci(y, p, 0.5, n_boot=200, groups=list(range(100)))["sensitivity"]
    assert lo <= binary_metrics(y, p, 0.5)["sensitivity"] <= hi
