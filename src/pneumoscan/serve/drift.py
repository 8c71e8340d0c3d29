"""Drift in the service's answers, read from its audit log (``pneumoscan audit --summary``).

Without labels a service cannot see its sensitivity fall; it can see its inputs and answers change.
Per UTC day, ISO week or month this counts the ``POST /v1/predict`` requests, how many were answered,
refused (by reason) or unreadable, how many were called PNEUMONIA, the mean calibrated P(PNEUMONIA)
and the risk levels, and compares four rates of each period with a baseline (every request before
``--baseline_until``, by default the first whole period): the refusal rate, the unreadable rate, the
PNEUMONIA-call rate and the share of answers with a low-detail warning (a site starting to send
downscaled or blurred copies; counted over the answers whose warnings the log holds, so not against a
baseline logged before that column existed).

A rate is flagged when it differs from the baseline's by at least ``MIN_EFFECT`` (5 points) **and** a
two-proportion z-test gives |z| >= ``Z_FLAG`` (3), where both sides have at least ``MIN_REQUESTS`` films
and an expected count of at least 5 in each outcome (the normal approximation holds). Repeated uploads
of one file within a period count once. Tested are only whole periods after the baseline: a period that
overlaps the baseline, or that is cut by ``--since`` or not over yet, is shown but not tested. A change
of model version or threshold makes a period not comparable: it is flagged as such and not tested.

The test treats requests as independent; they are not quite (one patient's films, batches, weekdays,
seasons: pneumonia is commoner in winter than in a summer baseline), so a flag is a reason to check,
not a diagnosis. What to do then: measure on labelled local films (``pneumoscan evaluate``) and refit
the operating point (``pneumoscan calibrate``).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable
from datetime import date, datetime, timedelta, timezone

PERIODS = ("day", "week", "month")
Z_FLAG = 3.0
MIN_EFFECT_PERCENT = 5  # in whole points, for an exact comparison (in floats 0.15 - 0.10 < 0.05)
MIN_EFFECT = MIN_EFFECT_PERCENT / 100
MIN_REQUESTS = 30
MIN_EXPECTED = 5.0
PREDICT_PATH = "/v1/predict"


def period_of(time_utc: str, by: str) -> str:
    """The period (UTC) a logged time falls in: ``2026-12-02``, ``2026-W49`` (ISO week) or ``2026-12``."""
    return _label(_period_start(time_utc, by), by)


def _period_start(time_utc: str, by: str) -> date:
    """The first day (UTC) of the period a logged time falls in."""
    return _start(datetime.fromisoformat(time_utc).astimezone(timezone.utc).date(), by)


def _start(d: date, by: str) -> date:
    if by == "day":
        return d
    if by == "week":
        return d - timedelta(days=d.weekday())  # ISO weeks start on Monday
    if by == "month":
        return d.replace(day=1)
    raise ValueError(f"unknown period {by!r}; choose one of {', '.join(PERIODS)}")


def _next(start: date, by: str) -> date:
    if by == "day":
        return start + timedelta(days=1)
    if by == "week":
        return start + timedelta(days=7)
    return (start.replace(day=28) + timedelta(days=4)).replace(day=1)


def _label(start: date, by: str) -> str:
    if by == "day":
        return start.isoformat()
    if by == "week":
        year, week, _ = start.isocalendar()
        return f"{year}-W{week:02d}"
    return f"{start.year}-{start.month:02d}"


def _utc(d: date) -> str:
    """Midnight UTC of ``d`` in the log's time format (comparable as text)."""
    return datetime(d.year, d.month, d.day, tzinfo=timezone.utc).isoformat(timespec="microseconds")


def _warnings(row: dict) -> list | None:
    """An answer's logged warnings; None where the row has none (before the column) or an unreadable value."""
    try:
        value = json.loads(row.get("warnings") or "null")
    except ValueError:
        return None
    return value if isinstance(value, list) else None


def _counts(rows: list[dict]) -> dict:
    from ..inference import has_low_detail_warning
    from ..scope_report import refusal_category  # the same reason categories as `evaluate`'s scope report

    def judged_row(r: dict) -> bool:  # answered, refused or unreadable: what the film was found to be
        return r["prediction"] is not None or r["status"] == 422

    # one film uploaded again within the period counts once, by its first answer where it got one: a retry
    # after a 503 (the page retries those) is that film's answer, not a repeat
    at: dict[str, int] = {}  # a film's place in ``unique``
    unique = []
    for r in rows:
        key = r["input_sha256"]
        if key and key in at:
            if judged_row(r) and not judged_row(unique[at[key]]):
                unique[at[key]] = r
            continue
        if key:
            at[key] = len(unique)
        unique.append(r)
    answered = [r for r in unique if r["prediction"] is not None]
    refused = [r for r in unique if r["error_type"] == "OutOfScopeError"]
    unreadable = [r for r in unique if r["status"] == 422 and r["error_type"] != "OutOfScopeError"]
    judged = len(answered) + len(refused)
    films = judged + len(unreadable)
    positive = sum(r["prediction"] == "PNEUMONIA" for r in answered)
    probs = [r["probability"] for r in answered if r["probability"] is not None]
    # the answers whose warnings are logged (rows written before the column have none)
    recorded = [w for w in map(_warnings, answered) if w is not None]
    low_detail = sum(map(has_low_detail_warning, recorded))
    return {
        "requests": len(rows), "repeated_uploads": len(rows) - len(unique), "answered": len(answered),
        "refused": len(refused), "unreadable": len(unreadable),
        "not_processed": len(unique) - films,  # no file, too large, overloaded, not authorised, ...
        "refused_by_reason": dict(Counter(refusal_category(r["error"] or "") for r in refused).most_common()),
        "refusal_rate": len(refused) / judged if judged else math.nan,
        "unreadable_rate": len(unreadable) / films if films else math.nan,
        "pneumonia_calls": positive,
        "pneumonia_call_rate": positive / len(answered) if answered else math.nan,
        "mean_probability": sum(probs) / len(probs) if probs else math.nan,
        "low_detail": low_detail, "warnings_recorded": len(recorded),
        "low_detail_rate": low_detail / len(recorded) if recorded else math.nan,
        "risk_levels": dict(Counter(r["risk_level"] for r in answered)),
        "model_versions": sorted({r["model_version"] for r in answered + refused if r["model_version"]}),
        "thresholds": sorted({r["threshold"] for r in answered + refused if r["threshold"] is not None}),
    }


# (name, numerator, denominator) of each tested rate
RATES = (("refusal rate", lambda c: c["refused"], lambda c: c["answered"] + c["refused"]),
         ("unreadable rate", lambda c: c["unreadable"], lambda c: c["answered"] + c["refused"] + c["unreadable"]),
         ("PNEUMONIA-call rate", lambda c: c["pneumonia_calls"], lambda c: c["answered"]),
         # answers with a low-detail warning (downscaled or blurred copies), among those whose warnings are logged
         ("low-detail rate", lambda c: c["low_detail"], lambda c: c["warnings_recorded"]))


def two_proportion_z(k1: int, n1: int, k0: int, n0: int) -> float | None:
    """z of k1/n1 against k0/n0 (pooled variance), or None where the normal approximation does not hold
    (fewer than ``MIN_REQUESTS`` on a side, or an expected count below ``MIN_EXPECTED``)."""
    if min(n1, n0) < MIN_REQUESTS:
        return None
    p = (k1 + k0) / (n1 + n0)
    if min(n1, n0) * min(p, 1 - p) < MIN_EXPECTED:
        return None
    return (k1 / n1 - k0 / n0) / math.sqrt(p * (1 - p) * (1 / n1 + 1 / n0))


def _flags(c: dict, base: dict) -> list[str]:
    if c["model_versions"] and base["model_versions"] and c["model_versions"] != base["model_versions"]:
        return [f"model {', '.join(c['model_versions'])} (baseline {', '.join(base['model_versions'])}): not "
                f"comparable with the baseline; set a new one (--baseline_until)"]
    if c["thresholds"] and base["thresholds"] and c["thresholds"] != base["thresholds"]:
        return ["threshold changed: not comparable with the baseline; set a new one (--baseline_until)"]
    out = []
    for name, num, den in RATES:
        k1, n1, k0, n0 = num(c), den(c), num(base), den(base)
        z = two_proportion_z(k1, n1, k0, n0)
        # |k1/n1 - k0/n0| >= 5 points, in integers: a change of exactly 5 points is flagged
        if z is not None and abs(z) >= Z_FLAG and 100 * abs(k1 * n0 - k0 * n1) >= MIN_EFFECT_PERCENT * n1 * n0:
            out.append(f"{name} {k1 / n1:.1%} against {k0 / n0:.1%} in the baseline (z = {z:+.1f})")
    return out


def summarise(rows: Iterable[dict], by: str = "day", baseline_until: str | None = None,
              since: str | None = None, now: datetime | None = None) -> dict:
    """Counts per period and drift flags against the baseline, from ``audit.iter_records`` rows.

    ``since``, ``baseline_until``: times in the log's format (UTC ISO 8601). Periods are shown from
    ``since`` on; the baseline is every row before ``baseline_until`` (whatever ``since`` says), or
    without it the first whole period shown. ``now`` (default: the clock) decides which period is not
    over yet.
    """
    if by not in PERIODS:
        raise ValueError(f"unknown period {by!r}; choose one of {', '.join(PERIODS)}")
    now_text = (now or datetime.now(timezone.utc)).astimezone(timezone.utc).isoformat(timespec="microseconds")
    predictions = [r for r in rows if r["path"] == PREDICT_PATH and r["method"] == "POST"]
    groups: dict[date, list[dict]] = {}
    for r in predictions:
        if since is None or r["time"] >= since:
            groups.setdefault(_period_start(r["time"], by), []).append(r)

    def untested_because(start: date) -> str | None:
        begin, end = _utc(start), _utc(_next(start, by))
        if since is not None and begin < since:
            return "cut by --since"
        if end > now_text:
            return "not over yet"
        if baseline_until is not None and begin < baseline_until:
            return "overlaps the baseline"
        return None

    if baseline_until is None:
        whole = [s for s in sorted(groups) if untested_because(s) is None]
        first = whole[0] if whole else None
        base_rows = groups.get(first, []) if first else []
        rule = f"the first whole {by} ({_label(first, by)})" if first else f"no whole {by} in the log"
        tested_from = _utc(_next(first, by)) if first else None
    else:
        base_rows = [r for r in predictions if r["time"] < baseline_until]
        rule, tested_from = f"requests before {baseline_until} (UTC)", baseline_until
    baseline = {"rule": rule, **_counts(base_rows)}
    usable = baseline["answered"] >= MIN_REQUESTS
    periods = {}
    for start in sorted(groups):
        c = _counts(groups[start])
        why = untested_because(start)
        if why is None and (tested_from is None or _utc(start) < tested_from):
            why = "the baseline"
        if why is None and not usable:
            why = f"baseline too small ({baseline['answered']} answered, fewer than {MIN_REQUESTS})"
        c["untested"] = why
        c["flags"] = [] if why else _flags(c, baseline)
        periods[_label(start, by)] = c
    return {"by": by, "baseline": baseline, "baseline_usable": usable, "periods": periods,
            "z_flag": Z_FLAG, "min_effect": MIN_EFFECT, "min_requests": MIN_REQUESTS,
            "flagged_periods": [k for k, c in periods.items() if c["flags"]]}


def format_summary(s: dict) -> str:
    """A plain-text table of ``summarise``, then the flags."""
    def pct(v: float) -> str:
        return "n/a" if v != v else f"{v:.1%}"

    b = s["baseline"]
    lines = [f"baseline: {b['rule']}: {b['answered']} answered, refusal rate {pct(b['refusal_rate'])}, "
             f"unreadable rate {pct(b['unreadable_rate'])}, PNEUMONIA-call rate {pct(b['pneumonia_call_rate'])}, "
             f"low-detail rate {pct(b['low_detail_rate'])}",
             f"{s['by']:<12} {'requests':>8} {'answered':>8} {'refused':>8} {'refusal':>8} {'unreadable':>10} "
             f"{'PNEUMONIA':>10} {'mean P':>7} {'low detail':>10}  LOW/MEDIUM/HIGH  tested"]
    for key, c in s["periods"].items():
        risk = "/".join(str(c["risk_levels"].get(k, 0)) for k in ("LOW", "MEDIUM", "HIGH"))
        mean_p = "n/a" if c["mean_probability"] != c["mean_probability"] else f"{c['mean_probability']:.3f}"
        tested = f"no: {c['untested']}" if c["untested"] else ("FLAGGED" if c["flags"] else "yes")
        lines.append(f"{key:<12} {c['requests']:>8} {c['answered']:>8} {c['refused']:>8} {pct(c['refusal_rate']):>8} "
                     f"{c['unreadable']:>10} {pct(c['pneumonia_call_rate']):>10} {mean_p:>7} "
                     f"{pct(c['low_detail_rate']):>10}  {risk:<15}  {tested}")
    for key in s["flagged_periods"]:
        for flag in s["periods"][key]["flags"]:
            lines.append(f"DRIFT {key}: {flag}")
    if s["flagged_periods"]:
        lines.append("A flag is a reason to check, not a diagnosis: measure on labelled local films (pneumoscan "
                     "evaluate) and, if the operating point has moved, refit it (pneumoscan calibrate).")
    return "\n".join(lines)
