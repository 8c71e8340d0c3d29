"""experiments/judge_candidate.py: the decision rule for a new default model, applied to the JSON files the
usual scripts write (real committed measurements and made-up ones that sit on either side of each limit)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _cv(auroc=0.999, ece=0.01, spec=0.98, cv_ece=0.01, stress=0.998, adult=0.75) -> dict:
    return {"ensemble_holdout": {"validation": {"at_threshold": {"metrics": {"auroc": {"value": auroc}}}},
                                 "ece_after_cross_fitted": ece,
                                 "stress_auroc": {"hist_eq": stress, "jpeg_q10": stress, "lowres_25": stress}},
            "oof": {"cross_validated": {"specificity": spec, "ece": cv_ece}, "auroc": {"ci_low": 0.9974}},
            "stress_auroc": {"hist_eq": 0.998, "jpeg_q10": 0.998, "lowres_25": 0.997},
            "adult_dev_shift": {"auroc_ensemble": adult}}


def _scope(adult=0.923, other=0.988, lateral=1.0, val=0.006, fullres=0.008) -> dict:
    by_class = {"adult_frontal": {"rate": adult}, "other_body": {"rate": other}, "lateral": {"rate": lateral}}
    return {"leave_one_source_out_by_class": by_class, "pediatric_val_cross_fitted": {"rate": val},
            "pediatric_fullres_patients_left_out": {"rate": fullres}}


COST = {"rows": [{"checkpoint": "shipped", "cost_vs_shipped": 1.0}, {"checkpoint": "ens", "cost_vs_shipped": 1.9}]}


def test_a_candidate_that_meets_every_limit_passes(experiment):
    judge = experiment("judge_candidate")
    rows = judge.judge(_cv(), _cv(), _scope(), _scope(), COST, 19.0)
    assert [r["verdict"] for r in rows] == ["holds"] * len(rows) and len(rows) == 13


@pytest.mark.parametrize(("change", "point"), [
    ({"auroc": 0.9970}, "1a held-out AUROC"),
    ({"ece": 0.031}, "1b held-out ECE, cross-fitted"),
    ({"spec": 0.974}, "2a cross-validated specificity (sensitivity >= 0.95)"),
    ({"stress": 0.99}, "3a mean stress AUROC, held-out films"),
    ({"adult": 0.69}, "3b adult dev_shift AUROC"),
])
def test_each_point_fails_on_its_own(experiment, change, point):
    judge = experiment("judge_candidate")
    rows = judge.judge(_cv(**change), _cv(), _scope(), _scope(), COST, 19.0)
    assert [r["point"] for r in rows if r["verdict"] != "holds"] == [point]


def test_scope_cost_and_size_limits(experiment):
    judge = experiment("judge_candidate")
    failed = lambda rows: [r["point"] for r in rows if r["verdict"] != "holds"]  # noqa: E731
    assert failed(judge.judge(_cv(), _cv(), _scope(adult=0.90), _scope(), COST, 19.0)) == [
        "4 adult_frontal, leave one source out"]  # 2.3 points below the shipped model's
    assert failed(judge.judge(_cv(), _cv(), _scope(fullres=0.0125), _scope(), COST, 19.0)) == [
        "4 pediatric_fullres_patients_left_out refused"]
    slow = copy.deepcopy(COST)
    slow["rows"][1]["cost_vs_shipped"] = 2.1
    assert failed(judge.judge(_cv(), _cv(), _scope(), _scope(), slow, 26.0)) == [
        "5a prediction cost against the shipped model (worst backend and batch)", "5b weights"]


def test_what_was_not_measured_does_not_pass(experiment, tmp_path, capsys):
    judge = experiment("judge_candidate")
    cv = tmp_path / "cv.json"
    cv.write_text(json.dumps(_cv()))
    out = tmp_path / "judged.json"
    assert judge.main(["--candidate_cv", str(cv), "--json", str(out)]) == 1
    verdicts = {r["point"]: r["verdict"] for r in json.loads(out.read_text())["rows"]}
    assert verdicts["5b weights"] == "not measured" and verdicts["1a held-out AUROC"] == "holds"
    assert "does not pass" in capsys.readouterr().out


def test_a_committed_candidate_is_judged_from_its_real_files(experiment, capsys):
    """The 5-fold fast recipe's ensemble (docs/cv) against the shipped model: its held-out AUROC, 0.9967,
    lies below the shipped model's CI (low end 0.9974), so point 1a fails."""
    judge = experiment("judge_candidate")
    code = judge.main(["--candidate_cv", str(DOCS / "cv" / "fast_acq_cosine_5fold.json")])
    table = capsys.readouterr().out
    assert code == 1 and "| 1a held-out AUROC | 0.9967 | >= 0.9974 (shipped model's CI low) | FAILS |" in table


def test_unreadable_or_foreign_inputs_say_so(experiment, tmp_path, capsys):
    judge = experiment("judge_candidate")
    assert judge.main(["--candidate_cv", str(tmp_path / "missing.json")]) == 2
    assert "cannot read" in capsys.readouterr().err
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"settings": {}}))
    assert judge.main(["--candidate_cv", str(other)]) == 2
    assert "not the JSON its script writes" in capsys.readouterr().err
