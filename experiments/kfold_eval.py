#!/usr/bin/env python
"""Out-of-fold numbers of a k-fold recipe (experiments/kfold.py), and its ensemble checkpoint.

For each fold, the fold's best model predicts its own validation fold (patients it never saw):
pooled, these out-of-fold (OOF) logits give
- AUROC with a patient-level bootstrap CI, and the mean and spread of the per-fold AUROCs;
- one temperature and one threshold (sensitivity >= 0.95) fitted on all OOF logits, and the
  specificity there (threshold in-sample: optimistic by construction);
- the same operating point cross-validated: for fold I, temperature and threshold fitted on the
  other folds' OOF logits and applied to fold I; pooled sensitivity, specificity, accuracy and ECE
  (the honest estimate of what a stored threshold does on new patients of this hospital);
- stress AUROC: the OOF films after changes no recipe trains on (histogram equalisation,
  JPEG quality 10, resolution loss to 25 %), a proxy for another hospital's processing;
- on dev_shift/adult_frontal (never trained on): the AUROC of "No finding" against the
  pneumonias, per fold model and for the ensemble (mean of the fold models' logits).

``--single MODEL`` gives the same numbers for one trained checkpoint on its own validation split
(for comparison with the shipped model). ``--write_ensemble PATH`` writes the fold models as one
ensemble checkpoint, calibrated with the OOF temperature and threshold.

    python experiments/kfold_eval.py --data_dir ../shared/data/chest_xray --runs /work/runs/cv/fast_acq \
        --json docs/cv/fast_acq.json
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from pneumoscan.calibration import fit_temperature, positive_probability
from pneumoscan.checkpoint import input_spec, load_checkpoint
from pneumoscan.cli import configure_logging
from pneumoscan.data import split_from_config
from pneumoscan.metrics import (
    auroc,
    binary_metrics,
    expected_calibration_error,
    metrics_with_ci,
    threshold_for_sensitivity,
)
from pneumoscan.predict import Predictor
from pneumoscan.preprocess import open_image

log = logging.getLogger("pneumoscan.kfold_eval")
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TARGET_SENSITIVITY = 0.95


def _hist_eq(a: np.ndarray) -> np.ndarray:
    return np.asarray(ImageOps.equalize(Image.fromarray(a)))


def _jpeg10(a: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=10)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))


def _lowres25(a: np.ndarray) -> np.ndarray:
    s = a.shape[0]
    img = Image.fromarray(a).resize((s // 4, s // 4), Image.BILINEAR)
    return np.asarray(img.resize((s, s), Image.BILINEAR))


STRESS = {"hist_eq": _hist_eq, "jpeg_q10": _jpeg10, "lowres_25": _lowres25}


def stressed(images: torch.Tensor, fn) -> torch.Tensor:
    return torch.from_numpy(np.stack([fn(a) for a in images.numpy()]))


def adult_films(folder: Path) -> tuple[list[Path], np.ndarray]:
    """dev_shift adult frontal films with a usable label: 0 = "No finding", 1 = a pneumonia."""
    # files over 1024 px or 600 kB were re-saved as .jpg under the same stem (dev_shift/README.md)
    by_stem = {f.stem: f for f in (folder / "adult_frontal").iterdir()}
    paths, labels = [], []
    with open(folder / "manifest.csv") as f:
        for row in csv.DictReader(f):
            if row["subfolder"] != "adult_frontal":
                continue
            label = row["label"].lower()
            if "inconclusive" in label or "unlabelled" in label:
                continue
            paths.append(by_stem[Path(row["file"]).stem])
            labels.append(0 if label.startswith("no finding") else 1)
    return paths, np.array(labels)


def adult_pixels(spec, paths: list[Path]) -> torch.Tensor:
    return torch.from_numpy(np.stack([spec.pixels(open_image(p)) for p in paths]))


def oof_report(logits: torch.Tensor, labels: torch.Tensor, patients: list[str], folds: np.ndarray) -> dict:
    y = labels.numpy()
    t_all = fit_temperature(logits, labels)
    p_all = positive_probability(logits, t_all)
    thr_all = threshold_for_sensitivity(y, p_all, TARGET_SENSITIVITY)
    at_thr = metrics_with_ci(y, p_all, thr_all, groups=patients)
    # cross-validated operating point: temperature and threshold from the other folds
    cv_prob = np.zeros(len(y))
    cv_pred = np.zeros(len(y), dtype=bool)
    per_fold = []
    for f in np.unique(folds):
        held, fit = folds == f, folds != f
        t = fit_temperature(logits[fit], labels[fit])
        thr = threshold_for_sensitivity(y[fit], positive_probability(logits[fit], t), TARGET_SENSITIVITY)
        cv_prob[held] = positive_probability(logits[held], t)
        cv_pred[held] = cv_prob[held] >= thr
        per_fold.append({"fold": int(f), "auroc": auroc(y[held], p_all[held]), "temperature": t, "threshold": thr})
    tp, tn = int((cv_pred & (y == 1)).sum()), int((~cv_pred & (y == 0)).sum())
    fold_aurocs = [r["auroc"] for r in per_fold]
    return {
        "n": len(y), "patients": len(set(patients)), "normal": int((y == 0).sum()), "pneumonia": int(y.sum()),
        "auroc": at_thr["metrics"]["auroc"],
        "fold_auroc_mean": float(np.mean(fold_aurocs)), "fold_auroc_sd": float(np.std(fold_aurocs, ddof=1))
        if len(fold_aurocs) > 1 else 0.0,
        "temperature": t_all, "threshold": thr_all,
        "at_oof_threshold": {k: at_thr["metrics"][k] for k in ("sensitivity", "specificity", "accuracy")},
        "ece_raw": expected_calibration_error(y, positive_probability(logits)),
        "ece_after_in_sample": expected_calibration_error(y, p_all),
        "cross_validated": {"sensitivity": tp / max(int(y.sum()), 1), "specificity": tn / max(int((y == 0).sum()), 1),
                            "accuracy": (tp + tn) / len(y), "ece": expected_calibration_error(y, cv_prob)},
        "per_fold": per_fold,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--runs", help="OUT/RECIPE of experiments/kfold.py (fold0, fold1, ...)")
    src.add_argument("--single", help="one checkpoint, evaluated on its own validation split")
    p.add_argument("--only_folds", type=int, nargs="*", help="use only these folds (a paired comparison)")
    p.add_argument("--json", required=True)
    p.add_argument("--write_ensemble", help="write the fold models as one calibrated ensemble checkpoint here")
    p.add_argument("--cache_dir", default="")
    p.add_argument("--adult_dir", default=str(SHARED / "dev_shift"),
                   help="dev_shift folder (manifest.csv, adult_frontal/); 'none' skips the adult films")
    args = p.parse_args(argv)
    configure_logging(None)
    torch.manual_seed(0)
    paths = sorted(Path(args.runs).glob("fold*/medical_cnn_model.pth")) if args.runs else [Path(args.single)]
    if args.runs and args.only_folds:
        paths = [q for q in paths if int(q.parent.name.removeprefix("fold")) in args.only_folds]
    if not paths:
        p.error(f"no fold*/medical_cnn_model.pth under {args.runs}")
    adult_paths, adult_y = adult_films(Path(args.adult_dir)) if args.adult_dir != "none" else ([], np.zeros(0))
    logits, labels, patients, folds = [], [], [], []
    stress_logits = {k: [] for k in STRESS}
    adult_logits, members = [], []
    for i, path in enumerate(paths):
        ckpt = load_checkpoint(path)
        members.append(ckpt)
        pred = Predictor.from_checkpoint(ckpt)
        spec = input_spec(ckpt)
        val = split_from_config(ckpt["config"], args.data_dir, spec.image_size, args.cache_dir).val
        lg = pred.logits(val.images)
        logits.append(lg)
        labels.append(val.labels)
        patients += [f"{p}" for p in val.patients]
        folds.append(np.full(len(val), i))
        for name, fn in STRESS.items():
            stress_logits[name].append(pred.logits(stressed(val.images, fn)))
        if adult_paths:
            adult_logits.append(pred.logits(adult_pixels(spec, adult_paths)))
        log.info("%s: %d validation films, AUROC %.4f", path, len(val),
                 auroc(val.labels.numpy(), positive_probability(lg)))
    logits_t, labels_t, folds_a = torch.cat(logits), torch.cat(labels), np.concatenate(folds)
    if len(paths) == 1:  # one model: cross-validate the operating point over 5 groups of its validation patients
        rng = np.random.default_rng(0)
        order = {pt: k % 5 for k, pt in enumerate(rng.permutation(sorted(set(patients))))}
        folds_a = np.array([order[pt] for pt in patients])
    report = {"source": args.runs or args.single, "members": len(paths),
              "oof": oof_report(logits_t, labels_t, patients, folds_a)}
    y = labels_t.numpy()
    report["stress_auroc"] = {k: auroc(y, positive_probability(torch.cat(v))) for k, v in stress_logits.items()}
    t, thr = report["oof"]["temperature"], report["oof"]["threshold"]
    report["adult_dev_shift"] = None
    if adult_logits:
        ens_adult = torch.stack(adult_logits).mean(0)
        adult_at = binary_metrics(adult_y, positive_probability(ens_adult, t), thr)
        report["adult_dev_shift"] = {
            "n": len(adult_y), "no_finding": int((adult_y == 0).sum()),
            "auroc_members": [auroc(adult_y, positive_probability(a)) for a in adult_logits],
            "auroc_ensemble": auroc(adult_y, positive_probability(ens_adult)),
            "no_finding_called_pneumonia": 1.0 - adult_at["specificity"],
        }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    o = report["oof"]
    log.info("OOF AUROC %.4f [%.4f, %.4f] (folds %.4f +- %.4f); at OOF threshold %.4f (T %.3f): spec %.3f; "
             "cross-validated: sens %.3f spec %.3f acc %.3f ECE %.4f; stress %s; adult AUROC ensemble %.3f",
             o["auroc"]["value"], o["auroc"]["ci_low"], o["auroc"]["ci_high"], o["fold_auroc_mean"],
             o["fold_auroc_sd"], o["threshold"], o["temperature"], o["at_oof_threshold"]["specificity"]["value"],
             o["cross_validated"]["sensitivity"], o["cross_validated"]["specificity"],
             o["cross_validated"]["accuracy"], o["cross_validated"]["ece"],
             {k: round(v, 4) for k, v in report["stress_auroc"].items()},
             (report["adult_dev_shift"] or {}).get("auroc_ensemble", float("nan")))
    if args.write_ensemble:
        from pneumoscan.ensemble import write_ensemble

        final = write_ensemble(members, args.write_ensemble, data_dir=args.data_dir, report=report,
                               cache_dir=args.cache_dir)
        report["ensemble_holdout"] = {k: final[k] for k in ("temperature", "threshold", "ece_before", "ece_after",
                                                             "ece_after_cross_fitted", "validation")}
        # the same proxies as for the fold models, on the held-out patients (comparable with --single on
        # a model trained on the usual split: the same films)
        ens = Predictor.from_checkpoint(load_checkpoint(args.write_ensemble))
        cfg = {**members[0]["config"], "cv_folds": 0}
        held = split_from_config(cfg, args.data_dir, ens.spec.image_size, args.cache_dir).val
        hy = held.labels.numpy()
        report["ensemble_holdout"]["stress_auroc"] = {
            k: auroc(hy, positive_probability(ens.logits(stressed(held.images, fn)))) for k, fn in STRESS.items()}
        log.info("ensemble on %d held-out films: AUROC %.4f, stress %s", len(held),
                 final["validation"]["at_threshold"]["metrics"]["auroc"]["value"],
                 {k: round(v, 4) for k, v in report["ensemble_holdout"]["stress_auroc"].items()})
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
