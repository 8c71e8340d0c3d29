"""Drift in the service's answers, read from its audit log (``pneumoscan audit --summary``).

Without labels a service cannot see its sensitivity fall; it can see its inputs and answers change.
Per day, week or month this counts the prediction requests, how many were refused (by reason), how
many were called PNEUMONIA, the mean calibrated P(PNEUMONIA) and the risk levels, and compares the
refusal rate and the PNEUMONIA-call rate of each period with a baseline (the period before
``--baseline_until``, by default the first period): a two-proportion z-test, flagged at |z| >= 3
(a strict bar, since many periods are tested). A flag is a reason to check, not a diagnosis: a new
referral pattern moves the call rate as much as a new X-ray machine. What to do then is the same:
measure on labelled local films (``pneumoscan evaluate``) and refit the operating point
(``pneumoscan calibrate``). A change of model version or threshold is flagged too, since the
periods before and after are not comparable.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from datetime import datetime

PERIODS = ("day", "week", "month")
Z_FLAG = 3.0
MIN_REQUESTS = 30  # fewer answered or refused requests in a period (or the baseline) than this: not tested
PREDICT_PATH = "/v1/predict"


def period_of(time_utc: str, by: str) -> str:
    """The period (UTC) a logged time falls in: ``2026-12-02``, ``2026-W49`` (ISO week) or ``2026-12``."""
    t = datetime.fromisoformat(time_utc)
    if by == "day":
        return t.date().isoformat()
    if by == "week":
        year, week, _ = t.isocalendar()
        return f"{year}-W{week:02d}"
    if by == "month":
        return f"{t.year}-{t.month:02d}"
    raise ValueError(f"unknown period {by!r}; choose one of {', '.join(PERIODS)}")


def _counts(rows: list[dict]) -> dict:
    from ..scope_report import refusal_category  # the same reason categories as `evaluate`'s scope report

    answered = [r for r in rows if r["prediction"] is not None]
    refused = [r for r in rows if r["error_type"] == "OutOfScopeError"]
    decided = len(answered) + len(refused)
    positive = sum(r["prediction"] == "PNEUMONIA" for r in answered)
    probs = [r["probability"] for r in answered if r["probability"] is not None]
    return {
        "requests": len(rows), "answered": len(answered), "refused": len(refused),
        "not_processed": len(rows) - decided,  # unreadable uploads, no file, overloaded, ...
        "refused_by_reason": dict(Counter(refusal_category(r["error"] or "") for r in refused).most_common()),
        "refusal_rate": len(refused) / decided if decided else math.nan,
        "pneumonia_calls": positive,
        "pneumonia_call_rate": positive / len(answered) if answered else math.nan,
        "mean_probability": sum(probs) / len(probs) if probs else math.nan,
        "risk_levels": dict(Counter(r["risk_level"] for r in answered)),
        "model_versions": sorted({r["model_version"] for r in answered + refused if r["model_version"]}),
        "thresholds": sorted({r["threshold"] for r in answered + refused if r["threshold"] is not None}),
    }


def _z(k1: int, n1: int, k0: int, n0: int) -> float:
    """Two-proportion z statistic of k1/n1 against k0/n0 (pooled variance); 0 when undefined."""
    if not n1 or not n0:
        return 0.0
    p = (k1 + k0) / (n1 + n0)
    se = math.sqrt(p * (1 - p) * (1 / n1 + 1 / n0))
    return 0.0 if se == 0 else (k1 / n1 - k0 / n0) / se


def _flags(c: dict, base: dict) -> list[str]:
    out = []
    if c["model_versions"] and base["model_versions"] and c["model_versions"] != base["model_versions"]:
        out.append(f"model {', '.join(c['model_versions'])} (baseline {', '.join(base['model_versions'])}): "
                   f"not comparable with the baseline")
    elif c["thresholds"] and base["thresholds"] and c["thresholds"] != base["thresholds"]:
        out.append("threshold changed: not comparable with the baseline")
    tests = (("refusal rate", "refused", c["answered"] + c["refused"], base["refused"],
              base["answered"] + base["refused"]),
             ("PNEUMONIA-call rate", "pneumonia_calls", c["answered"], base["pneumonia_calls"], base["answered"]))
    for name, key, n1, k0, n0 in tests:
        if n1 < MIN_REQUESTS or n0 < MIN_REQUESTS:
            continue
        z = _z(c[key], n1, k0, n0)
        if abs(z) >= Z_FLAG:
            out.append(f"{name} {c[key] / n1:.1%} against {k0 / n0:.1%} in the baseline (z = {z:+.1f})")
    return out


def summarise(rows: Iterable[dict], by: str = "day", baseline_until: str | None = None,
              since: str | None = None) -> dict:
    """Counts per period and drift flags against the baseline, from ``audit.iter_records`` rows.

    ``since``, ``baseline_until``: times in the log's format (UTC ISO 8601). Periods are shown from
    ``since`` on; the baseline is every row before ``baseline_until`` (whatever ``since`` says), or
    without it the first period shown.
    """
    if by not in PERIODS:
        raise ValueError(f"unknown period {by!r}; choose one of {', '.join(PERIODS)}")
    predictions = [r for r in rows if r["path"] == PREDICT_PATH]
    groups: dict[str, list[dict]] = {}
    for r in predictions:
        if since is None or r["time"] >= since:
            groups.setdefault(period_of(r["time"], by), []).append(r)
    if baseline_until is None:
        first = min(groups) if groups else None
        base_rows = groups.get(first, [])
        baseline = {"rule": f"the first {by}" + (f" ({first})" if first else ""), **_counts(base_rows)}
    else:
        base_rows = [r for r in predictions if r["time"] < baseline_until]
        baseline = {"rule": f"requests before {baseline_until} (UTC)", **_counts(base_rows)}
    periods = {}
    for key in sorted(groups):
        c = _counts(groups[key])
        c["flags"] = _flags(c, baseline) if base_rows else []
        periods[key] = c
    return {"by": by, "baseline": baseline, "periods": periods, "z_flag": Z_FLAG, "min_requests": MIN_REQUESTS,
            "flagged_periods": [k for k, c in periods.items() if c["flags"]]}


def format_summary(s: dict) -> str:
    """A plain-text table of ``summarise``, then the flags."""
    def pct(v: float) -> str:
        return "  n/a" if v != v else f"{v:5.1%}"

    lines = [f"baseline: {s['baseline']['rule']}: {s['baseline']['answered']} answered, refusal rate "
             f"{pct(s['baseline']['refusal_rate'])}, PNEUMONIA-call rate {pct(s['baseline']['pneumonia_call_rate'])}",
             f"{s['by']:<12} {'requests':>8} {'answered':>8} {'refused':>8} {'refusal':>8} {'PNEUMONIA':>10} "
             f"{'mean P':>7}  LOW/MEDIUM/HIGH  flags"]
    for key, c in s["periods"].items():
        risk = "/".join(str(c["risk_levels"].get(k, 0)) for k in ("LOW", "MEDIUM", "HIGH"))
        mean_p = "   n/a" if c["mean_probability"] != c["mean_probability"] else f"{c['mean_probability']:6.3f}"
        lines.append(f"{key:<12} {c['requests']:>8} {c['answered']:>8} {c['refused']:>8} {pct(c['refusal_rate']):>8} "
                     f"{pct(c['pneumonia_call_rate']):>10} {mean_p:>7}  {risk:<15}  {len(c['flags']) or ''}")
    for key in s["flagged_periods"]:
        for flag in s["periods"][key]["flags"]:
            lines.append(f"DRIFT {key}: {flag}")
    if s["flagged_periods"]:
        lines.append("A flag is a reason to check, not a diagnosis: measure on labelled local films (pneumoscan "
                     "evaluate) and, if the operating point has moved, refit it (pneumoscan calibrate).")
    return "\n".join(lines)
