"""Clinical metrics for a binary screen (positive class: PNEUMONIA), with bootstrap CIs.

Names follow clinical use: sensitivity (recall, TPR), specificity (TNR), PPV
(precision), NPV, F1, AUROC. A metric whose denominator is zero is NaN, never 0.
"""

from __future__ import annotations

import math

import numpy as np

METRIC_NAMES = ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "auroc")


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


def check_prevalence(value: float, name: str = "prevalence") -> float:
    """``value`` as a float if it is a prevalence (strictly between 0 and 1).

    Raises:
        ValueError: it is not, with what to give instead.
    """
    v = float(value)
    if not 0.0 < v < 1.0:  # also rejects NaN
        raise ValueError(f"{name} {value}: give the share of films that show pneumonia, strictly between 0 and 1 "
                         f"(e.g. 0.2 when 1 film in 5 does)")
    return v


def predictive_values(sensitivity: float, specificity: float, prevalence: float) -> tuple[float, float]:
    """(PPV, NPV) of a screen with this sensitivity and specificity where pneumonia has ``prevalence``."""
    prevalence = check_prevalence(prevalence)
    tp, fp = sensitivity * prevalence, (1.0 - specificity) * (1.0 - prevalence)
    tn, fn = specificity * (1.0 - prevalence), (1.0 - sensitivity) * prevalence
    ppv = tp / (tp + fp) if tp + fp > 0 else float("nan")
    npv = tn / (tn + fn) if tn + fn > 0 else float("nan")
    return ppv, npv


def finite_scores(scores, what: str = "scores") -> np.ndarray:
    """``scores`` as float64, refused if any is NaN or infinite (a NaN sorts as the highest score, counts as a
    negative call and falls out of every calibration bin: three different wrong numbers).

    Raises:
        ValueError: a score is not finite.
    """
    s = np.asarray(scores, dtype=np.float64)
    bad = int((~np.isfinite(s)).sum())
    if bad:
        raise ValueError(f"{bad} of {s.size} {what} are NaN or infinite (a faulty model or backend): no metric "
                         f"can be computed from them")
    return s


def auroc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve by the Mann-Whitney rank statistic (ties count half)."""
    y = np.asarray(y_true).astype(bool)
    s = finite_scores(scores)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average ranks over ties
    boundaries = np.flatnonzero(np.diff(sorted_s)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [len(s)]))
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def confusion(y_true: np.ndarray, prob: np.ndarray, threshold: float) -> dict[str, int]:
    """TP/FP/TN/FN with PNEUMONIA predicted when ``prob >= threshold``."""
    y = np.asarray(y_true).astype(bool)
    pred = finite_scores(prob, "probabilities") >= threshold
    return {"tp": int((pred & y).sum()), "fp": int((pred & ~y).sum()),
            "tn": int((~pred & ~y).sum()), "fn": int((~pred & y).sum())}


def binary_metrics(y_true: np.ndarray, prob: np.ndarray, threshold: float = 0.5,
                   prevalence: float | None = None) -> dict[str, float]:
    """Accuracy, sensitivity, specificity, PPV, NPV, F1 at ``threshold``, and AUROC.

    PPV and NPV are those of these films, whose share of pneumonia may be far from a clinic's; with
    ``prevalence`` they are also given where pneumonia has that prevalence (``ppv_at_prevalence``,
    ``npv_at_prevalence``, from the sensitivity and specificity).
    """
    c = confusion(y_true, prob, threshold)
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    sens, spec, ppv = _ratio(tp, tp + fn), _ratio(tn, tn + fp), _ratio(tp, tp + fp)
    out = {
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
        "sensitivity": sens,
        "specificity": spec,
        "ppv": ppv,
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "auroc": auroc(y_true, prob),
    }
    if prevalence is not None:
        out["ppv_at_prevalence"], out["npv_at_prevalence"] = predictive_values(sens, spec, prevalence)
    return out


def bootstrap_ci(y_true: np.ndarray, prob: np.ndarray, threshold: float = 0.5, n_boot: int = 1000,
                 alpha: float = 0.05, seed: int = 0, groups: list | np.ndarray | None = None,
                 prevalence: float | None = None) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap (1 - alpha) CIs for every metric.

    With ``groups`` (e.g. patient ids) whole groups are resampled, which keeps the
    correlation between images of one patient and gives honest, wider intervals.

    Raises:
        ValueError: ``groups`` does not give one group per film (the films without one were never resampled).
    """
    y = np.asarray(y_true)
    p = np.asarray(prob, dtype=np.float64)
    rng = np.random.default_rng(seed)
    if groups is not None and len(groups) != len(y):
        raise ValueError(f"{len(groups)} groups for {len(y)} films: give each film's patient")
    if groups is not None:
        _, inverse = np.unique(np.asarray(groups), return_inverse=True)
        members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]
    samples: dict[str, list[float]] = {name: [] for name in binary_metrics(y[:0], p[:0], threshold, prevalence)}
    for _ in range(n_boot):
        if groups is not None:
            pick = rng.integers(0, len(members), len(members))
            idx = np.concatenate([members[g] for g in pick])
        else:
            idx = rng.integers(0, len(y), len(y))
        for name, value in binary_metrics(y[idx], p[idx], threshold, prevalence).items():
            samples[name].append(value)
    out = {}
    for name, vals in samples.items():
        v = np.asarray(vals)
        v = v[~np.isnan(v)]
        out[name] = ((float(np.quantile(v, alpha / 2)), float(np.quantile(v, 1 - alpha / 2)))
                     if len(v) else (float("nan"), float("nan")))
    return out


def metrics_with_ci(y_true, prob, threshold: float = 0.5, n_boot: int = 1000, seed: int = 0,
                    groups=None, prevalence: float | None = None) -> dict:
    """``{"threshold", "n", "confusion", "metrics": {name: {"value", "ci_low", "ci_high"}}}``; with
    ``prevalence``, also ``"prevalence"`` and the PPV and NPV there (``binary_metrics``)."""
    point = binary_metrics(y_true, prob, threshold, prevalence)
    ci = bootstrap_ci(y_true, prob, threshold, n_boot=n_boot, seed=seed, groups=groups, prevalence=prevalence)
    extra = {} if prevalence is None else {"prevalence": float(prevalence)}
    return {
        **extra,
        "threshold": float(threshold),
        "n": int(len(y_true)),
        "n_positive": int(np.sum(y_true)),
        "confusion": confusion(y_true, prob, threshold),
        "ci_method": f"percentile bootstrap, {n_boot} resamples, "
                     + ("resampling patients" if groups is not None else "resampling images"),
        "metrics": {m: {"value": point[m], "ci_low": ci[m][0], "ci_high": ci[m][1]} for m in point},
    }


def metric_label(name: str, report: dict) -> str:
    """How a metric of ``metrics_with_ci`` output is shown: its name, or e.g. "ppv at 20%" for the PPV where
    pneumonia has the report's ``prevalence``."""
    if name.endswith("_at_prevalence"):
        return f"{name.split('_')[0]} at {100 * report['prevalence']:g}%"
    return name


def format_metrics_table(report: dict) -> str:
    """A plain-text table of ``metrics_with_ci`` output."""
    lines = [f"threshold {report['threshold']:.4f}, n = {report['n']} "
             f"({report['n_positive']} PNEUMONIA), 95% CI: {report['ci_method']}",
             f"{'metric':<12} {'value':>7}   95% CI"]
    for name, m in report["metrics"].items():
        lines.append(f"{metric_label(name, report):<12} {m['value']:7.4f}   [{m['ci_low']:.4f}, {m['ci_high']:.4f}]")
    c = report["confusion"]
    lines.append(f"confusion: TP {c['tp']}  FN {c['fn']}  TN {c['tn']}  FP {c['fp']}")
    return "\n".join(lines)


def reliability_bins(y_true: np.ndarray, prob: np.ndarray, n_bins: int = 15) -> list[dict]:
    """Per-bin confidence, accuracy and count, confidence being that of the predicted class at 0.5.

    Raises:
        ValueError: a probability is not finite or outside [0, 1] (a logit or a score given for a probability:
            its confidence would fall outside every bin and the film out of the ECE).
    """
    y = np.asarray(y_true).astype(int)
    p = finite_scores(prob, "probabilities")
    outside = int(((p < 0.0) | (p > 1.0)).sum())
    if outside:
        raise ValueError(f"{outside} of {p.size} probabilities are outside [0, 1] (logits or scores?): calibration "
                         f"is measured on probabilities")
    pred = (p >= 0.5).astype(int)
    conf = np.where(pred == 1, p, 1.0 - p)
    correct = (pred == y).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (conf > lo) & (conf <= hi)
        n = int(mask.sum())
        bins.append({"low": float(lo), "high": float(hi), "count": n,
                     "confidence": float(conf[mask].mean()) if n else float("nan"),
                     "accuracy": float(correct[mask].mean()) if n else float("nan")})
    return bins


def expected_calibration_error(y_true: np.ndarray, prob: np.ndarray, n_bins: int = 15) -> float:
    """ECE (Guo et al. 2017): count-weighted mean |accuracy - confidence| over equal-width bins."""
    bins = reliability_bins(y_true, prob, n_bins)
    total = sum(b["count"] for b in bins)
    if not total:
        return float("nan")
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]) / total)


def threshold_for_sensitivity(y_true: np.ndarray, prob: np.ndarray, target: float) -> float:
    """An operating threshold with sensitivity >= ``target`` and the best specificity at that sensitivity.

    The highest threshold meeting the target is the score of the k-th most suspicious positive;
    a threshold exactly on a data point flips that case with any rounding difference (another
    CPU, bf16 on a GPU). So the threshold returned is the midpoint between that score and the
    next lower score of any case: it classifies the given data exactly as the highest one does,
    with a margin on both sides.
    """
    p = finite_scores(prob, "probabilities")
    y = np.asarray(y_true).astype(bool)
    pos = np.sort(p[y])[::-1]
    if len(pos) == 0:
        raise ValueError("cannot choose a threshold for sensitivity without positive cases")
    k = math.ceil(target * len(pos))  # need at least k positives at or above the threshold
    if k > 1 and (k - 1) / len(pos) >= target:  # target * n rounded up in floating point (0.56 * 25)
        k -= 1
    highest = float(pos[k - 1])
    below = p[p < highest]
    return (highest + (float(below.max()) if len(below) else 0.0)) / 2.0


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval for k of n (NaN, NaN for n = 0)."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
