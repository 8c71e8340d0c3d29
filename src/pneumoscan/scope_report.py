"""What the scope checks did to a folder of inputs: refused by reason, answered with warnings, risk levels.

``pneumoscan evaluate`` uses it for a folder without NORMAL/ and PNEUMONIA/ (or with ``--scope_report``):
there is no label to score, only how many inputs were refused or flagged, and why.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from .inference import (
    LOW_DETAIL_NOTE_PREFIX,
    InferenceFailure,
    InferenceResult,
    has_low_detail_warning,
    unvalidated_kind,
)
from .metrics import wilson_interval
from .names import printable

# How a refusal's reason text reads, first match wins (texts: scope.REASONS, gate.py, dicom.py).
REFUSAL_CATEGORIES = (
    ("adult_frontal", "outside the validated population"),
    ("lateral", "lateral view"),
    ("other_body", "another body part"),
    ("altered_chest", "rotated, inverted or cut-off"),
    ("non_radiograph", "not a radiograph"),
    ("too_small", "image too small"),
    ("blank", "blank or uniform"),
    ("colour", "colour image"),
    ("feature_distance", "unlike the chest radiographs"),
    ("dicom_modality", "DICOM modality"),
)


def refusal_category(error: str, image_path: str = "") -> str:
    """The category of a refusal (``OutOfScopeError``) from its reason text; ``other`` when none matches.
    ``image_path``, which the engine's errors start with, is cut off first: a folder named "PA and lateral
    views" must not make every refusal in it a lateral one."""
    if image_path and error.startswith(f"{image_path}: "):
        error = error[len(image_path) + 2:]
    for name, marker in REFUSAL_CATEGORIES:
        if marker in error:
            return name
    return "other"


def _category(outcome: InferenceFailure) -> str:
    """``refusal_category`` of an engine's refusal, whose error starts with its path."""
    return refusal_category(outcome.error, outcome.image_path)


def _group(path: str, base: Path) -> str:
    try:
        parts = Path(path).relative_to(base).parts
    except ValueError:
        return "."
    return parts[0] if len(parts) > 1 else "."


def _refused(o) -> bool:
    """A refusal by the scope checks (no answer, by design), as opposed to an input that could not be read."""
    return isinstance(o, InferenceFailure) and o.error_type == "OutOfScopeError"


def _faulty(o) -> bool:
    """No answer for a reason that is not the input's (a non-finite model output, an internal failure)."""
    return isinstance(o, InferenceFailure) and o.error_type == "InferenceError"


def _unreadable(o) -> bool:
    return isinstance(o, InferenceFailure) and not _refused(o) and not _faulty(o)


def _outcome(o) -> str:
    """One input's fate in the per-file list: refused (by the scope checks), unreadable, internal error, or
    answered."""
    return ("refused" if _refused(o) else "unreadable" if _unreadable(o) else "internal error" if _faulty(o)
            else "answered")


_FLAG_REASONS = {"view": "view (lateral or not frontal)", "population": "population (adult?)"}


def _flag_reason(warnings: list[str]) -> str | None:
    """Why an answer carries a warning that keeps it from risk LOW: the view, or the population; None if none."""
    return _FLAG_REASONS.get(unvalidated_kind(warnings))


def _counts(outcomes: list) -> dict:
    n = len(outcomes)
    refused = [o for o in outcomes if _refused(o)]
    unreadable = [o for o in outcomes if _unreadable(o)]
    faulty = [o for o in outcomes if _faulty(o)]
    answered = [o for o in outcomes if isinstance(o, InferenceResult)]
    flagged = [r for r in answered if unvalidated_kind(r.warnings)]
    low_detail = [r for r in answered if has_low_detail_warning(r.warnings)]
    refused_low_detail = [o for o in refused if LOW_DETAIL_NOTE_PREFIX in o.error]
    handled = len(refused) + len(flagged)
    judged = n - len(unreadable) - len(faulty)  # the films the checks had a say on
    lo, hi = wilson_interval(handled, judged)
    return {
        "inputs": n, "unreadable": len(unreadable), "internal_errors": len(faulty), "refused": len(refused),
        "refused_by_reason": dict(Counter(_category(o) for o in refused).most_common()),
        "answered": len(answered), "answered_with_lateral_or_population_warning": len(flagged),
        "flagged_by_reason": dict(Counter(_flag_reason(r.warnings) for r in flagged).most_common()),
        "answered_with_low_detail_warning": len(low_detail), "refused_with_low_detail_note": len(refused_low_detail),
        "refused_or_flagged": handled, "refused_or_flagged_rate": handled / max(judged, 1),
        "refused_or_flagged_ci95": [lo, hi],
        "answered_risk_levels": dict(Counter(r.risk_level for r in answered)),
        "answered_predictions": dict(Counter(r.prediction for r in answered)),
        "answered_low_risk_pneumonia": sum(r.risk_level == "LOW" and r.prediction == "PNEUMONIA" for r in answered),
    }


def scope_report(outcomes: list, base: str | Path) -> dict:
    """Counts over all ``outcomes`` (``iter_predict`` results) and per first-level sub-folder of ``base``."""
    base = Path(base)
    groups: dict[str, list] = {}
    for o in outcomes:
        groups.setdefault(_group(o.image_path or "", base), []).append(o)
    report = {"data_dir": str(base), "all": _counts(outcomes)}
    if len(groups) > 1 or "." not in groups:
        report["by_folder"] = {g: _counts(v) for g, v in sorted(groups.items())}
    report["files"] = [{"path": o.image_path, "outcome": _outcome(o),
                        "reason": _category(o) if _refused(o) else None,
                        "error": getattr(o, "error", None), "risk_level": getattr(o, "risk_level", None),
                        "prediction": getattr(o, "prediction", None), "warnings": getattr(o, "warnings", [])}
                       for o in outcomes]
    return report


def format_scope_report(report: dict) -> str:
    """A plain-text table of ``scope_report``: one line per folder, then the reasons."""
    rows = [("all", report["all"])] + list(report.get("by_folder", {}).items())
    lines = [f"{'folder':<24} {'inputs':>6} {'refused':>8} {'flagged':>8} {'answered':>9} "
             f"{'refused+flagged [95% CI]':>28}  LOW-risk PNEUMONIA"]
    for name, c in rows:
        lo, hi = c["refused_or_flagged_ci95"]
        flagged, low = c["answered_with_lateral_or_population_warning"], c["answered_low_risk_pneumonia"]
        lines.append(f"{printable(name):<24} {c['inputs']:>6} {c['refused']:>8} {flagged:>8} {c['answered']:>9} "
                     f"{c['refused_or_flagged_rate']:>11.1%} [{lo:.1%}, {hi:.1%}]  {low:>6}")
    for name, c in rows:
        refused = ", ".join(f"{k} {v}" for k, v in c["refused_by_reason"].items()) or "none"
        flagged = ", ".join(f"{k} {v}" for k, v in c["flagged_by_reason"].items()) or "none"
        lines.append(f"{printable(name)}: refused by reason: {refused}; flagged by reason: {flagged}")
    if report["all"]["unreadable"]:
        lines.append(f"unreadable (not counted): {report['all']['unreadable']}")
    if report["all"]["internal_errors"]:
        lines.append(f"no answer, internal error (not counted; see the log): {report['all']['internal_errors']}")
    return "\n".join(lines)


def in_use_report(outcomes: list, labels) -> dict:
    """What the whole pipeline (scope checks, calibrated call, risk rule) did to labelled films.

    ``outcomes`` are ``iter_predict`` results in the order of ``labels`` (1 = PNEUMONIA). The model-only
    metrics count every film; in use a refused film gets no answer and a wrong answer with LOW risk is
    the error a reader is least likely to question, so both are counted here, by true class.
    """
    if len(outcomes) != len(labels):
        raise ValueError(f"{len(outcomes)} outcomes for {len(labels)} labelled films")
    truth = ["PNEUMONIA" if int(y) == 1 else "NORMAL" for y in labels]
    counts = _counts(outcomes)

    def by_class(keep) -> dict[str, int]:
        c = Counter(t for o, t in zip(outcomes, truth) if keep(o))
        return {k: c.get(k, 0) for k in ("NORMAL", "PNEUMONIA")}

    answered = [(o, t) for o, t in zip(outcomes, truth) if isinstance(o, InferenceResult)]
    pos = [o for o, t in answered if t == "PNEUMONIA"]
    neg = [o for o, t in answered if t == "NORMAL"]
    tp, tn = sum(o.prediction == "PNEUMONIA" for o in pos), sum(o.prediction == "NORMAL" for o in neg)
    wrong_low = Counter(t for o, t in answered if o.prediction != t and o.risk_level == "LOW")
    return {
        "films": len(outcomes), "refused": counts["refused"], "unreadable": counts["unreadable"],
        "internal_errors": counts["internal_errors"],
        "refused_by_reason": counts["refused_by_reason"],
        "refused_by_class": by_class(_refused), "unreadable_by_class": by_class(_unreadable),
        "answered": len(answered), "answered_by_class": {"NORMAL": len(neg), "PNEUMONIA": len(pos)},
        "answered_with_lateral_or_population_warning": counts["answered_with_lateral_or_population_warning"],
        "answered_with_low_detail_warning": counts["answered_with_low_detail_warning"],
        "refused_with_low_detail_note": counts["refused_with_low_detail_note"],
        "answered_pneumonia_called_pneumonia": tp, "answered_normal_called_normal": tn,
        "answered_sensitivity": tp / len(pos) if pos else math.nan,
        "answered_specificity": tn / len(neg) if neg else math.nan,
        "answered_risk_levels": counts["answered_risk_levels"],
        "wrong_with_low_risk": sum(wrong_low.values()),
        "wrong_with_low_risk_by_class": {c: wrong_low.get(c, 0) for c in ("NORMAL", "PNEUMONIA")},
        "refused_files": [{"path": o.image_path, "reason": _category(o)} for o in outcomes
                          if _refused(o)],
    }


def _share(k: int, n: int) -> str:
    """``k/n = 0.950 [0.93, 0.97]`` (Wilson 95 %), or ``n/a`` when no film."""
    if not n:
        return "n/a (none answered)"
    lo, hi = wilson_interval(k, n)
    return f"{k}/{n} = {k / n:.3f} [{lo:.3f}, {hi:.3f}]"


def format_in_use(r: dict) -> str:
    """What a reader of the service's answers would have seen for these films."""
    reasons = ", ".join(f"{k} {v}" for k, v in r["refused_by_reason"].items()) or "none"
    wrong, refused, answered = r["wrong_with_low_risk_by_class"], r["refused_by_class"], r["answered_by_class"]
    unreadable = f", unreadable {r['unreadable']}" if r["unreadable"] else ""
    unreadable += f", no answer (internal error) {r['internal_errors']}" if r.get("internal_errors") else ""
    backend = f", backend {r['backend']}" if r.get("backend") else ""
    return "\n".join([
        f"in use (the whole pipeline, scope checks included{backend}): {r['films']} films, refused {r['refused']} "
        f"({refused['NORMAL']} NORMAL, {refused['PNEUMONIA']} PNEUMONIA; by reason: {reasons}){unreadable}, answered "
        f"{r['answered']} ({r['answered_with_lateral_or_population_warning']} with a lateral or population warning, "
        f"{r['answered_with_low_detail_warning']} with a low-detail warning; {r['refused_with_low_detail_note']} of "
        f"the refused have lost detail)",
        f"on the answered films (film level, Wilson 95 % CI): sensitivity "
        f"{_share(r['answered_pneumonia_called_pneumonia'], answered['PNEUMONIA'])}, specificity "
        f"{_share(r['answered_normal_called_normal'], answered['NORMAL'])}; wrong with LOW risk: "
        f"{r['wrong_with_low_risk']} ({wrong['NORMAL']} NORMAL called PNEUMONIA, {wrong['PNEUMONIA']} PNEUMONIA "
        f"called NORMAL)",
    ])
