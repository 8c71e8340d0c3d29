#!/usr/bin/env python
"""Logistic (Platt) calibration with an intercept against the shipped temperature, on films the
calibration did not see (docs/experiments.md, "Calibration with an intercept", rule written first).

For one checkpoint on its own validation split, cross-fitted over 5 patient groups (``cv.deal_patients``):
for each group, on the *other* groups' plain films, the temperature T and the threshold for sensitivity
>= 0.95 (the shipped recipe), and the logistic fit P = sigmoid(z / T' + b) (``calibration.fit_logistic``) with that
threshold mapped through it (z* = T logit(thr), thr' = sigmoid(z* / T' + b)), so both make the same call on
every film. Counted on the held group's plain films and their stress copies
(``kfold_eval.STRESS``): 15-bin ECE, answers with risk LOW, wrong answers with risk LOW. The dev_shift adult
films with a label (``kfold_eval.adult_films``, all of them: the scope checks are not measured here) get
the fits on all 780 films. Also: sets drawn at other prevalences (``prevalence_check``), restated.

    cd experiments && PYTHONPATH=. python platt_calibration.py --data_dir ../../shared/data/chest_xray \\
        --json ../docs/cv/platt_calibration_v21.json
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from kfold_eval import STRESS, adult_films, adult_pixels, stressed
from prevalence_check import (
    PREVALENCES,
    answers,
    at_prevalence,
    drawn_sets,
    parser,
    reference_shares,
    summarise,
    validation_of,
)

from pneumoscan.calibration import fit_logistic, fit_temperature
from pneumoscan.cv import deal_patients
from pneumoscan.metrics import threshold_for_sensitivity
from pneumoscan.results import command_line, write_json

log = logging.getLogger("pneumoscan.platt_calibration")
TARGET = 0.95


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def fits(z: np.ndarray, y: np.ndarray) -> dict:
    """Both calibrations and their (equivalent) thresholds, fitted on logit differences ``z``."""
    logits = torch.from_numpy(np.stack([np.zeros_like(z), z], 1))
    labels = torch.from_numpy(y)
    t = fit_temperature(logits, labels)
    thr = threshold_for_sensitivity(y, sigmoid(z / t), TARGET)
    t2, b = fit_logistic(logits, labels)
    z_star = t * np.log(thr / (1.0 - thr))
    return {"temperature": {"t": t, "b": 0.0, "thr": thr},
            "logistic": {"t": t2, "b": b, "thr": float(sigmoid(z_star / t2 + b))}}


def prob(z: np.ndarray, f: dict) -> np.ndarray:
    return sigmoid(z / f["t"] + f["b"])


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, 300)
    p.add_argument("--dev_shift", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "dev_shift"))
    args = p.parse_args(argv)
    model_path, ckpt, predictor, val = validation_of(args)
    y = val.labels.numpy().astype(int)

    def zdiff(images: torch.Tensor) -> np.ndarray:
        lg = predictor.logits(images).double()
        return (lg[:, 1] - lg[:, 0]).numpy()

    sets = {"plain": zdiff(val.images)}
    for name, fn in STRESS.items():
        sets[name] = zdiff(stressed(val.images, fn))
    groups = deal_patients(list(val.patients), 5)
    held = {r: {s: np.empty(len(y)) for s in sets} for r in ("temperature", "logistic")}
    calls = {r: {s: np.empty(len(y), bool) for s in sets} for r in held}
    per_group = []
    for g in range(5):
        h, f = groups == g, groups != g
        fit = fits(sets["plain"][f], y[f])
        per_group.append({"group": g, **fit})
        for r in held:
            for s, z in sets.items():
                held[r][s][h] = prob(z[h], fit[r])
                calls[r][s][h] = held[r][s][h] >= fit[r]["thr"]
    report: dict = {"model_path": model_path, "model_version": ckpt.get("model_version"), "films": len(y),
                    "per_group": per_group, "cross_fitted": {}, "adult_dev_shift": {}, "prevalence_draws": {}}
    same = True
    for s in sets:
        same &= bool(np.array_equal(calls["temperature"][s], calls["logistic"][s]))
        report["cross_fitted"][s] = {r: answers(y, held[r][s], calls[r][s]) for r in held}
    full = fits(sets["plain"], y)
    report["fitted_on_all"] = full
    paths, ya = adult_films(Path(args.dev_shift))
    za = zdiff(adult_pixels(predictor.spec, paths))
    ca = {r: prob(za, full[r]) >= full[r]["thr"] for r in full}
    same &= bool(np.array_equal(ca["temperature"], ca["logistic"]))
    report["adult_dev_shift"] = {"n": len(ya), "no_finding": int((ya == 0).sum()),
                                 **{r: answers(ya, prob(za, full[r]), ca[r]) for r in full}}
    report["calls_identical"] = same
    rng = np.random.default_rng(0)
    ref = reference_shares(y, groups)
    for prev in PREVALENCES:
        out = {k: [] for k in ("temperature", "logistic", "logistic_restated")}
        for idx in drawn_sets(y, prev, args.films, args.draws, rng):
            c = calls["temperature"]["plain"][idx]
            out["temperature"].append(answers(y[idx], held["temperature"]["plain"][idx], c))
            out["logistic"].append(answers(y[idx], held["logistic"]["plain"][idx], c))
            restated = at_prevalence(held["logistic"]["plain"][idx], prev, ref[idx])
            out["logistic_restated"].append(answers(y[idx], restated, c))
        report["prevalence_draws"][str(prev)] = {k: summarise(v) for k, v in out.items()}
    for s, row in report["cross_fitted"].items():
        t, lg = row["temperature"], row["logistic"]
        log.info("%-9s ECE %.4f -> %.4f  LOW %d -> %d  wrong LOW %d -> %d", s, t["ece"], lg["ece"], t["low"], lg["low"],
                 t["wrong_low"], lg["wrong_low"])
    a = report["adult_dev_shift"]
    log.info("adults    ECE %.4f -> %.4f  LOW %d -> %d  wrong LOW %d -> %d (normals %d -> %d)", a["temperature"]["ece"],
             a["logistic"]["ece"], a["temperature"]["low"], a["logistic"]["low"], a["temperature"]["wrong_low"],
             a["logistic"]["wrong_low"], a["temperature"]["wrong_low_normal"], a["logistic"]["wrong_low_normal"])
    log.info("calls identical: %s; fitted on all: T %.4f, logistic T' %.4f b %.4f thr %.4f", same,
             full["temperature"]["t"], full["logistic"]["t"], full["logistic"]["b"], full["logistic"]["thr"])
    report["command"] = command_line("experiments/platt_calibration.py", argv)
    write_json(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
