#!/usr/bin/env python
"""Does ``pneumoscan calibrate --intercept`` help a site, and from how many patients?

A site calibration fits and counts on the same kind of films: the site's own. Here a "site" is a random
set of the shipped model's validation patients (``--sizes`` patients, ``--repeats`` draws each; all 404
once), as they are (plain) or histogram-equalised (a processing change that moves the logits). Each site
is cross-fitted over 5 of its patient groups as ``calibrate`` does (``cv.deal_patients``): the temperature
and threshold (``calibration.fit_calibrated_point``), or the logistic calibration with intercept and its
threshold (``intercept=True``), fitted on 4 groups and counted on the fifth. Counted: 15-bin ECE, wrong
answers with risk LOW (``prevalence_check.answers``). Draws with fewer than 10 films of a class are skipped.

    cd experiments && PYTHONPATH=. python site_intercept.py --data_dir ../../shared/data/chest_xray \\
        --json ../docs/cv/site_intercept_v21.json
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch
from kfold_eval import STRESS, stressed
from prevalence_check import answers, validation_of

from pneumoscan.cv import OutOfFold, cross_fitted, deal_patients
from pneumoscan.results import command_line, write_json

log = logging.getLogger("pneumoscan.site_intercept")


def site_numbers(logits: torch.Tensor, y: np.ndarray, patients: list[str], intercept: bool) -> dict:
    """What ``calibrate`` estimates for a site's next patients, with or without the intercept."""
    oof = OutOfFold(logits, torch.from_numpy(y), patients, deal_patients(patients, 5))
    prob, pred, _ = cross_fitted(oof, 0.95, intercept=intercept)
    return answers(y, prob, pred)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--model_path", default=None)
    p.add_argument("--cache_dir", default="")
    p.add_argument("--sizes", type=int, nargs="+", default=[60, 100, 200, 300])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    model_path, ckpt, predictor, val = validation_of(args)
    y_all = val.labels.numpy().astype(int)
    patients_all = np.array(val.patients)
    kinds = {"plain": predictor.logits(val.images),
             "hist_eq": predictor.logits(stressed(val.images, STRESS["hist_eq"]))}
    every = np.unique(patients_all)
    rng = np.random.default_rng(0)
    report: dict = {"model_path": model_path, "model_version": ckpt.get("model_version"), "sites": {}}
    for kind, logits_all in kinds.items():
        for size in [*args.sizes, len(every)]:
            rows = []
            for _ in range(args.repeats if size < len(every) else 1):
                chosen = rng.choice(every, size, replace=False) if size < len(every) else every
                m = np.isin(patients_all, chosen)
                y = y_all[m]
                if min((y == 0).sum(), (y == 1).sum()) < 10:
                    continue
                idx = torch.from_numpy(np.flatnonzero(m))
                rows.append({r: site_numbers(logits_all[idx], y, list(patients_all[m]), r == "logistic")
                             for r in ("temperature", "logistic")} | {"films": int(m.sum())})
            t = np.array([r["temperature"]["ece"] for r in rows])
            lg = np.array([r["logistic"]["ece"] for r in rows])
            films = np.array([r["films"] for r in rows])
            wrong = {k: 1000 * np.array([r[k]["wrong_low"] for r in rows]) / films for k in ("temperature", "logistic")}
            out = {"patients": size, "draws": len(rows), "films_mean": float(films.mean()),
                   "ece_temperature": float(t.mean()), "ece_logistic": float(lg.mean()),
                   "logistic_better_share": float((lg < t).mean()),
                   "wrong_low_per_1000_temperature": float(wrong["temperature"].mean()),
                   "wrong_low_per_1000_logistic": float(wrong["logistic"].mean())}
            report["sites"][f"{kind}_{size}"] = out
            log.info("%-8s %3d patients (%4.0f films) x%2d: ECE %.4f vs %.4f (logistic lower in %3.0f%%); wrong "
                     "with LOW per 1000 films %.1f vs %.1f", kind, size, out["films_mean"], out["draws"],
                     out["ece_temperature"], out["ece_logistic"], 100 * out["logistic_better_share"],
                     out["wrong_low_per_1000_temperature"], out["wrong_low_per_1000_logistic"])
    report["command"] = command_line("experiments/site_intercept.py", argv)
    write_json(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
