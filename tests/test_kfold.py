"""experiments/kfold.py and kfold_eval.py end to end on real films: patient-level folds trained by the
ordinary trainer, restartable, out-of-fold numbers, and a calibrated ensemble that predicts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pneumoscan.checkpoint import load_checkpoint
from pneumoscan.inference import MedicalImageInference

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "experiments" / script), *args], capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def cv_runs(tmp_path_factory, smoke_data) -> Path:
    out = tmp_path_factory.mktemp("cv")
    args = ["--data_dir", str(smoke_data), "--out", str(out), "--recipe", "fast_acq", "--folds", "2", "--holdout",
            "--epochs", "1", "--image_size", "64", "--width", "0.25", "--batch_size", "16",
            "--cache_dir", str(out / "cache")]
    done = run("kfold.py", *args)
    assert done.returncode == 0, done.stderr[-2000:]
    again = run("kfold.py", *args)  # a finished fold is not trained again
    assert again.returncode == 0 and again.stderr.count("finished earlier, skipped") == 2, again.stderr[-2000:]
    return out


def test_folds_validate_on_disjoint_patients_that_cover_the_data(cv_runs):
    val_patients, n_val = [], 0
    for fold in (0, 1):
        res = json.loads((cv_runs / "fast_acq" / f"fold{fold}" / "training_results.json").read_text())
        assert res["config"]["cv_folds"] == 2 and res["config"]["cv_fold"] == fold
        assert res["config"]["augment"] == "acquisition"
        assert res["data"]["validation"].startswith(f"fold {fold} of 2 patient-level folds")
        n_val += res["data"]["val"]["images"]
        val_patients.append(res["data"]["val"]["patients"])
    # every film outside the held-out patients validated once
    assert n_val == res["data"]["train"]["images"] + res["data"]["val"]["images"]
    assert "held out" in res["data"]["validation"]


def test_out_of_fold_report_and_ensemble(cv_runs, smoke_data, fullres_dir, tmp_path):
    report_path, ens_path = tmp_path / "cv.json", tmp_path / "ens.pth"
    done = run("kfold_eval.py", "--data_dir", str(smoke_data), "--runs", str(cv_runs / "fast_acq"),
               "--json", str(report_path), "--adult_dir", "none", "--write_ensemble", str(ens_path),
               "--cache_dir", str(cv_runs / "cache"))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(report_path.read_text())
    oof = report["oof"]
    assert report["members"] == 2 and oof["n"] == oof["normal"] + oof["pneumonia"] > 100
    assert 0.0 <= oof["auroc"]["ci_low"] <= oof["auroc"]["value"] <= oof["auroc"]["ci_high"] <= 1.0
    assert oof["at_oof_threshold"]["sensitivity"]["value"] >= 0.95  # the OOF threshold's own data
    assert 0.0 <= oof["cross_validated"]["ece"] <= 1.0 and len(oof["per_fold"]) == 2
    assert set(report["stress_auroc"]) == {"hist_eq", "jpeg_q10", "lowres_25"}

    ckpt = load_checkpoint(ens_path)
    held = report["ensemble_holdout"]  # calibrated on the patients no member saw
    assert ckpt["arch"] == "ensemble" and ckpt["temperature"] == pytest.approx(held["temperature"])
    assert ckpt["threshold"] == pytest.approx(held["threshold"]) and ckpt["ood_gate"] is not None
    assert held["validation"]["at_threshold"]["metrics"]["sensitivity"]["value"] >= 0.95
    assert set(held["stress_auroc"]) == {"hist_eq", "jpeg_q10", "lowres_25"}
    engine = MedicalImageInference(str(ens_path), device="cpu")
    film = next((fullres_dir / "PNEUMONIA").iterdir())
    result = engine.predict_image(str(film))
    assert result.prediction in ("NORMAL", "PNEUMONIA")
    assert sum(result.probabilities.values()) == pytest.approx(1.0)
    assert torch.isfinite(torch.tensor(result.confidence))
