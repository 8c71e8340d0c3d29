#!/usr/bin/env python
"""Out-of-fold numbers of a k-fold recipe (experiments/kfold.py), and its ensemble checkpoint.

For each fold, the fold's best model predicts its own validation fold (patients it never saw):
pooled, these out-of-fold (OOF) logits give the numbers of ``pneumoscan.cv.oof_report`` (AUROC with
a patient-level CI, OOF temperature and threshold, the cross-validated operating point and ECE),
and here also
- stress AUROC: the OOF films after changes no recipe trains on (histogram equalisation,
  JPEG quality 10, resolution loss to 25 %), a proxy for another hospital's processing; and on the
  same changed films, sensitivity, specificity and ECE at the operating point cross-fitted on the
  plain films (``stress_at_plain_operating_point``): does the stored calibration hold?
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

from pneumoscan.calibration import positive_probability
from pneumoscan.checkpoint import input_spec, load_checkpoint
from pneumoscan.cli import configure_logging
from pneumoscan.cv import collect_oof, cross_fitted, deal_patients, oof_report, operating_point
from pneumoscan.data import split_from_config
from pneumoscan.metrics import auroc, binary_metrics
from pneumoscan.predict import Predictor
from pneumoscan.preprocess import open_image

log = logging.getLogger("pneumoscan.kfold_eval")
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _hist_eq(a: np.ndarray) -> np.ndarray:
    return np.asarray(ImageOps.equalize(Image.fromarray(a)))


def _jpeg10(a: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=10)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))


def _lowres25(a: np.ndarray) -> np.ndarray:
    h, w = a.shape
    img = Image.fromarray(a).resize((max(w // 4, 1), max(h // 4, 1)), Image.BILINEAR)
    return np.asarray(img.resize((w, h), Image.BILINEAR))


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
    oof, members, vals = collect_oof(paths, args.data_dir, args.cache_dir)
    if len(paths) == 1:  # one model: cross-validate the operating point over 5 groups of its validation patients
        oof.folds = deal_patients(oof.patients)
    stress_logits = {k: [] for k in STRESS}
    adult_logits = []
    for path, ckpt, val in zip(paths, members, vals):  # the shift proxies, each model on its own fold
        pred, spec = Predictor.from_checkpoint(ckpt), input_spec(ckpt)
        for name, fn in STRESS.items():
            stress_logits[name].append(pred.logits(stressed(val.images, fn)))
        if adult_paths:
            adult_logits.append(pred.logits(adult_pixels(spec, adult_paths)))
        log.info("%s: shift proxies done", path)
    report = {"source": args.runs or args.single, "members": len(paths), "oof": oof_report(oof)}
    labels_t = oof.labels
    y = labels_t.numpy()
    report["stress_auroc"] = {k: auroc(y, positive_probability(torch.cat(v))) for k, v in stress_logits.items()}
    # per model, then averaged: pooling mixes models whose logit scales differ (see oof fold_auroc_mean)
    bounds = np.cumsum([0] + [len(v) for v in stress_logits[next(iter(STRESS))]])
    report["stress_auroc_fold_mean"] = {
        k: float(np.mean([auroc(y[a:b], positive_probability(lg)) for a, b, lg in zip(bounds[:-1], bounds[1:], v)]))
        for k, v in stress_logits.items()}
    # does the operating point hold when the films change and the calibration does not? Temperature and
    # threshold cross-fitted on the plain films (as "cross_validated"), applied to the changed copies
    report["stress_at_plain_operating_point"] = {
        k: operating_point(y, *cross_fitted(oof, applied_to=torch.cat(v))[:2]) for k, v in stress_logits.items()}
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
    for k, m in report["stress_at_plain_operating_point"].items():
        log.info("%s at the plain films' cross-fitted operating point: sens %.3f spec %.3f ECE %.4f",
                 k, m["sensitivity"], m["specificity"], m["ece"])
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
