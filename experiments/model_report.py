#!/usr/bin/env python
"""Validation figures of a checkpoint on the patient-level split it was trained with.

Rebuilds the validation split from the checkpoint's own config (seed, val_fraction), then
reports metrics with patient-bootstrap CIs at the stored threshold and at 0.5, ECE (15 bins)
before and after the stored temperature, a cross-fitted ECE (temperature fitted on half the
patients, measured on the other half), a reliability diagram, and how often predictions on
full-size originals (fullres_sample/, stretch-resized at inference) agree with the 224 px copies.

    python experiments/model_report.py --out docs/model   # the shipped model
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from pneumoscan.calibration import cross_fitted_ece, positive_probability, temperature_text
from pneumoscan.checkpoint import default_model_path, load_checkpoint
from pneumoscan.cli import configure_logging
from pneumoscan.data import split_from_config
from pneumoscan.inference import MedicalImageInference, list_inputs
from pneumoscan.metrics import expected_calibration_error, metrics_with_ci, reliability_bins
from pneumoscan.plots import plot_reliability
from pneumoscan.predict import Predictor, resolve_device
from pneumoscan.results import write_json

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=None)
    p.add_argument("--data_dir", default=str(SHARED / "chest_xray"))
    p.add_argument("--fullres_dir", default=str(SHARED / "fullres_sample"))
    p.add_argument("--out", required=True)
    args = p.parse_args()
    configure_logging()
    path = args.model_path or str(default_model_path())
    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    predictor = Predictor.from_checkpoint(ckpt, resolve_device("auto"))
    splits = split_from_config(cfg, args.data_dir, predictor.spec.image_size)
    logits = predictor.logits(splits.val.images)
    y = splits.val.labels.numpy()
    raw, cal = positive_probability(logits), positive_probability(logits, predictor.temperature, predictor.bias)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "model_path": path, "model_version": ckpt.get("model_version"), "val": splits.info["val"],
        "threshold": ckpt["threshold"], "temperature": ckpt["temperature"], "calibration_bias": predictor.bias,
        "at_threshold": metrics_with_ci(y, cal, ckpt["threshold"], groups=splits.val.patients),
        "at_0.5": metrics_with_ci(y, cal, 0.5, groups=splits.val.patients),
        "ece_before": expected_calibration_error(y, raw),
        "ece_after": expected_calibration_error(y, cal),
        "ece_after_cross_fitted": cross_fitted_ece(logits, splits.val.labels, splits.val.patients),
    }
    plot_reliability({f"before (ECE {report['ece_before']:.3f})": reliability_bins(y, raw),
                      f"after T = {temperature_text(ckpt['temperature'], 2)} (ECE {report['ece_after']:.3f})":
                      reliability_bins(y, cal)}, out / "reliability_diagram.png", title="validation")
    if Path(args.fullres_dir).is_dir():
        engine = MedicalImageInference(path, gate=False)
        full = list_inputs(args.fullres_dir)
        small = [Path(args.data_dir) / "train" / f.parent.name / f.name for f in full]
        a = [r.probabilities["PNEUMONIA"] for r in engine.predict_batch(full)]
        b = [r.probabilities["PNEUMONIA"] for r in engine.predict_batch(small)]
        truth = np.array([f.parent.name == "PNEUMONIA" for f in full])
        pa, pb = np.array(a) >= engine.threshold, np.array(b) >= engine.threshold
        report["fullres_vs_224"] = {"n": len(full), "agreement": float((pa == pb).mean()),
                                    "mean_abs_prob_diff": float(np.abs(np.array(a) - np.array(b)).mean()),
                                    "accuracy_fullres": float((pa == truth).mean()),
                                    "accuracy_224": float((pb == truth).mean()),
                                    "note": "these 240 images are training-set images (some in our train split)"}
    write_json(report, out / "validation_report.json")
    print(json.dumps({k: v for k, v in report.items() if k not in ("at_threshold", "at_0.5")}, indent=2))
    from pneumoscan.metrics import format_metrics_table
    print(format_metrics_table(report["at_threshold"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
