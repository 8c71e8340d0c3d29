#!/usr/bin/env python
"""The decision rule for a new default model (docs/experiments.md, "CPU plan when no GPU is lent"), applied
point by point to the measurements a candidate from ``experiments/gpu_cv.sh`` comes back with.

Written down before any such candidate existed, so that whoever gets a GPU run judges it by the rule and
not by the look of the numbers. Each point reads one of the JSON files the usual scripts write:

- ``--candidate_cv``: ``kfold_eval.py --runs ... --write_ensemble`` (the candidate's out-of-fold report and
  its ensemble on the 780 held-out validation films);
- ``--baseline_cv``: ``kfold_eval.py --single`` on the shipped model (default ``docs/cv/v2_single.json``:
  v2.1 has v2.0's weights, temperature and threshold);
- ``--candidate_scope`` / ``--baseline_scope``: ``fit_scope.py --json`` on each (default baseline: the
  shipped fit, ``docs/scope/scope_eval_v2_cleangate.json``; refit the baseline on the same machine when the
  candidate's scope fit runs elsewhere: docs/scope.md);
- ``--cost``: ``benchmarks/model_cost.py --candidate ENSEMBLE --json``; ``--candidate_model``: the ensemble
  file (its size).

Point 4 also holds the full-size originals to issue 7's limit (at most 1 % refused), which the rule as first
written left out. A point whose input is not given is "not measured", and the candidate does not pass.
Exit status: 0 every point holds, 1 a point fails or is not measured, 2 an input cannot be read.

    python experiments/judge_candidate.py --candidate_cv OUT/cv_full_acq_f01.json \\
        --candidate_scope scope_full_acq.json --cost cost.json --candidate_model OUT/ensemble_full_acq_2.pth \\
        --json judged.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pneumoscan.cli import configure_logging
from pneumoscan.results import command_line, write_json

log = logging.getLogger("pneumoscan.judge_candidate")
ROOT = Path(__file__).resolve().parents[1]
MAX_ECE = 0.03
MIN_CV_SPECIFICITY = 0.975  # the fast recipe's cross-validated specificity at sensitivity >= 0.95
ADULT_AUROC_SLACK = 0.05  # 27 normal adult films: a smaller gap is noise
SCOPE_SLACK = 0.02  # leave-one-source-out refusal rates, per class
MAX_PEDIATRIC_REFUSED = 0.01
MAX_COST = 2.0
MAX_WEIGHTS_MB = 25.0
SCOPE_CLASSES = ("adult_frontal", "other_body", "lateral")


def _point(name: str, value, limit: str, holds: bool | None) -> dict:
    return {"point": name, "value": value, "limit": limit,
            "verdict": "not measured" if holds is None else ("holds" if holds else "FAILS")}


def _mean(d: dict) -> float:
    return sum(d.values()) / len(d)


def judge(candidate_cv: dict, baseline_cv: dict, candidate_scope: dict | None = None,
          baseline_scope: dict | None = None, cost: dict | None = None, weights_mb: float | None = None) -> list[dict]:
    """The rule's points, each with the measured value, its limit and the verdict."""
    rows = []
    held = candidate_cv.get("ensemble_holdout")
    floor = baseline_cv["oof"]["auroc"]["ci_low"]
    if held is None:
        rows.append(_point("1a held-out AUROC", None, f">= {floor:.4f} (shipped model's CI low)", None))
        rows.append(_point("1b held-out ECE, cross-fitted", None, f"<= {MAX_ECE}", None))
    else:
        auroc = held["validation"]["at_threshold"]["metrics"]["auroc"]["value"]
        rows.append(_point("1a held-out AUROC", auroc, f">= {floor:.4f} (shipped model's CI low)", auroc >= floor))
        ece = held["ece_after_cross_fitted"]
        rows.append(_point("1b held-out ECE, cross-fitted", ece, f"<= {MAX_ECE}", ece <= MAX_ECE))
    cv = candidate_cv["oof"]["cross_validated"]
    rows.append(_point("2a cross-validated specificity (sensitivity >= 0.95)", cv["specificity"],
                       f">= {MIN_CV_SPECIFICITY}", cv["specificity"] >= MIN_CV_SPECIFICITY))
    rows.append(_point("2b cross-validated ECE", cv["ece"], f"<= {MAX_ECE}", cv["ece"] <= MAX_ECE))
    base_stress = _mean(baseline_cv["stress_auroc"])
    stress = None if held is None else _mean(held["stress_auroc"])
    rows.append(_point("3a mean stress AUROC, held-out films", stress, f">= {base_stress:.4f} (shipped model)",
                       None if stress is None else stress >= base_stress))
    cand_adult, base_adult = candidate_cv.get("adult_dev_shift"), baseline_cv.get("adult_dev_shift")
    if cand_adult and base_adult:
        limit = base_adult["auroc_ensemble"] - ADULT_AUROC_SLACK
        rows.append(_point("3b adult dev_shift AUROC", cand_adult["auroc_ensemble"], f">= {limit:.4f}",
                           cand_adult["auroc_ensemble"] >= limit))
    else:
        rows.append(_point("3b adult dev_shift AUROC", None, "shipped model's - 0.05", None))
    if candidate_scope is None or baseline_scope is None:
        rows.append(_point("4 scope and population checks refitted on its features", None,
                           "leave-one-source-out within 2 points; pediatric refusals <= 1 %", None))
    else:
        for cls in SCOPE_CLASSES:
            c = candidate_scope["leave_one_source_out_by_class"][cls]["rate"]
            b = baseline_scope["leave_one_source_out_by_class"][cls]["rate"]
            rows.append(_point(f"4 {cls}, leave one source out", c, f">= {b - SCOPE_SLACK:.3f}", c >= b - SCOPE_SLACK))
        for key in ("pediatric_val_cross_fitted", "pediatric_fullres_patients_left_out"):
            r = candidate_scope[key]["rate"]
            rows.append(_point(f"4 {key} refused", r, f"<= {MAX_PEDIATRIC_REFUSED}", r <= MAX_PEDIATRIC_REFUSED))
    if cost is None:
        rows.append(_point("5a prediction cost against the shipped model", None, f"<= {MAX_COST}x", None))
    else:
        worst = max(r["cost_vs_shipped"] for r in cost["rows"] if r["checkpoint"] != "shipped")
        rows.append(_point("5a prediction cost against the shipped model (worst backend and batch)", worst,
                           f"<= {MAX_COST}x", worst <= MAX_COST))
    rows.append(_point("5b weights", weights_mb, f"<= {MAX_WEIGHTS_MB} MB",
                       None if weights_mb is None else weights_mb <= MAX_WEIGHTS_MB))
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = ["| point | measured | limit | verdict |", "|---|---|---|---|"]
    for r in rows:
        value = "-" if r["value"] is None else (f"{r['value']:.4f}" if isinstance(r["value"], float) else r["value"])
        lines.append(f"| {r['point']} | {value} | {r['limit']} | {r['verdict']} |")
    return "\n".join(lines)


class InputError(Exception):
    """An input file that cannot be read as JSON."""


def _read(path: str | None) -> dict | None:
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidate_cv", required=True, help="kfold_eval.py --runs ... --write_ensemble JSON")
    p.add_argument("--baseline_cv", default=str(ROOT / "docs" / "cv" / "v2_single.json"))
    p.add_argument("--candidate_scope", help="fit_scope.py --model_path ENSEMBLE --json output")
    p.add_argument("--baseline_scope", default=str(ROOT / "docs" / "scope" / "scope_eval_v2_cleangate.json"))
    p.add_argument("--cost", help="benchmarks/model_cost.py --candidate ENSEMBLE --json output")
    p.add_argument("--candidate_model", help="the ensemble checkpoint (for its size)")
    p.add_argument("--json", help="also write the verdicts here")
    args = p.parse_args(argv)
    configure_logging()
    try:
        rows = judge(_read(args.candidate_cv), _read(args.baseline_cv), _read(args.candidate_scope),
                     _read(args.baseline_scope), _read(args.cost),
                     Path(args.candidate_model).stat().st_size / 2**20 if args.candidate_model else None)
    except (InputError, OSError) as exc:
        log.error("%s", exc)
        return 2
    except (KeyError, TypeError) as exc:
        log.error("an input is not the JSON its script writes (missing %s); see --help for which script", exc)
        return 2
    sys.stdout.write(format_rows(rows) + "\n")
    passed = all(r["verdict"] == "holds" for r in rows)
    sys.stdout.write("the candidate passes every point\n" if passed else
                     "the candidate does not pass: the shipped model stays (record the table in docs/experiments.md)\n")
    if args.json:
        write_json({"rows": rows, "passes": passed,
                    "command": command_line("experiments/judge_candidate.py", argv)}, args.json)
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
