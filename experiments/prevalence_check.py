#!/usr/bin/env python
"""Would probabilities restated for another prevalence hold there?

If a calibrated P(PNEUMONIA) were the posterior where pneumonia is as common as among the films the
temperature was fitted on (the shipped model's validation films: 74 % pneumonia, far more than in most
clinics), ``at_prevalence`` would restate it for another prevalence by Bayes' rule (the film's likelihood
ratio kept, the prior odds replaced; prior-shift adjustment, Saerens et al. 2002). Measured here on one
checkpoint's own validation split, cross-fitted over 5 patient groups (``cv.deal_patients``): each group's
probabilities come from a temperature fitted on the other groups (whose prevalence is the reference). From
those held-out films, sets with a chosen prevalence are drawn (films with replacement, ``--draws`` sets of
``--films``; films of one patient are not kept together, so the spread is a little narrow), and on each:
15-bin ECE, mean P(PNEUMONIA) against the true share, the calls at the stored threshold (they do not
change), answers with risk LOW and wrong answers with risk LOW (``inference.risk_level`` on the
probabilities), as calibrated (unchanged) and restated for the set's prevalence. The model alone: no scope
checks.

    cd experiments && PYTHONPATH=. python prevalence_check.py --data_dir ../../shared/data/chest_xray \\
        --json ../docs/cv/prevalence_check_v21.json
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

from pneumoscan.calibration import fit_temperature
from pneumoscan.checkpoint import default_model_path, load_checkpoint
from pneumoscan.cli import configure_logging
from pneumoscan.cv import OutOfFold, cross_fitted, deal_patients
from pneumoscan.data import split_from_config
from pneumoscan.inference import RISK_LOW, normalized_entropy, risk_level
from pneumoscan.metrics import expected_calibration_error
from pneumoscan.predict import Predictor
from pneumoscan.results import command_line, write_json

log = logging.getLogger("pneumoscan.prevalence_check")
PREVALENCES = (0.05, 0.1, 0.2, 0.3, 0.5, 0.625, 0.742)


def at_prevalence(p_pos, prevalence: float, reference: float):
    """P(PNEUMONIA) ``p_pos`` that holds where pneumonia has prevalence ``reference``, restated for
    ``prevalence``: the odds times the ratio of the prior odds (monotone, so calls are unchanged)."""
    ratio = (prevalence / (1.0 - prevalence)) / (reference / (1.0 - reference))
    p = np.asarray(p_pos, dtype=np.float64)
    return p * ratio / (p * ratio + (1.0 - p))


def reference_shares(y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """For each film, the share of pneumonia among the films of the *other* groups (what its cross-fitted
    calibration was fitted on)."""
    out = np.empty(len(y))
    for g in np.unique(groups):
        out[groups == g] = y[groups != g].mean()
    return out


def drawn_sets(y: np.ndarray, prevalence: float, films: int, draws: int, rng: np.random.Generator):
    """Indices of ``draws`` sets of ``films`` films of which ``prevalence`` show pneumonia (films drawn with
    replacement within each class)."""
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    n_pos = int(round(prevalence * films))
    for _ in range(draws):
        yield np.concatenate([rng.choice(pos, n_pos), rng.choice(neg, films - n_pos)])


def answers(y: np.ndarray, p: np.ndarray, call: np.ndarray) -> dict:
    """ECE, mean probability, and the LOW-risk answers of films with P(PNEUMONIA) ``p`` and calls ``call``."""
    conf = np.where(call, p, 1.0 - p)
    low = np.array([risk_level(float(c), normalized_entropy([1.0 - q, q])) == RISK_LOW for c, q in zip(conf, p)])
    wrong = call != (y == 1)
    return {"ece": expected_calibration_error(y, p), "mean_p": float(p.mean()), "low": int(low.sum()),
            "wrong_low": int((low & wrong).sum()), "wrong_low_normal": int((low & wrong & (y == 0)).sum())}


def summarise(values: list[dict]) -> dict:
    out = {}
    for key in values[0]:
        v = np.array([d[key] for d in values], dtype=float)
        out[key] = {"mean": float(v.mean()), "ci95": [float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))]}
    return out


def parser(doc: str, draws: int) -> argparse.ArgumentParser:
    """The flags both prevalence scripts take."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="the training data (train/NORMAL, train/PNEUMONIA)")
    p.add_argument("--model_path", default=None, help="checkpoint (default: the shipped model)")
    p.add_argument("--cache_dir", default="")
    p.add_argument("--films", type=int, default=600, help="films per drawn set")
    p.add_argument("--draws", type=int, default=draws, help="sets drawn per prevalence")
    p.add_argument("--json", required=True)
    return p


def validation_of(args) -> tuple[str, dict, Predictor, object]:
    """(path, checkpoint, predictor, its own validation split) of ``--model_path``."""
    configure_logging()
    model_path = args.model_path or str(default_model_path())
    ckpt = load_checkpoint(model_path)
    predictor = Predictor.from_checkpoint(ckpt)
    val = split_from_config(ckpt["config"], args.data_dir, predictor.spec.image_size, args.cache_dir).val
    return model_path, ckpt, predictor, val


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__, 500).parse_args(argv)
    model_path, ckpt, predictor, val = validation_of(args)
    logits = predictor.logits(val.images)
    y = val.labels.numpy().astype(int)
    refit = fit_temperature(logits, val.labels)
    stored_t, thr = ckpt.get("temperature"), float(ckpt.get("threshold", 0.5))
    log.info("validation: %d films, %.4f pneumonia; temperature refitted %.4f, stored %s", len(y), y.mean(), refit,
             stored_t)
    report: dict = {"model_path": model_path, "model_version": ckpt.get("model_version"), "films": len(y),
                    "validation_prevalence": float(y.mean()), "temperature_refitted": refit,
                    "temperature_stored": stored_t, "threshold": thr, "films_per_set": args.films,
                    "draws": args.draws, "by_prevalence": {}}
    groups = deal_patients(list(val.patients), 5)
    # each group's probabilities from the temperature fitted on the other groups (cv.cross_fitted's first output)
    prob = cross_fitted(OutOfFold(logits, val.labels, list(val.patients), groups))[0]
    reference = reference_shares(y, groups)
    call = prob >= thr  # the calls: the same at any prevalence (at_prevalence is monotone)
    rng = np.random.default_rng(0)
    for prev in PREVALENCES:
        kept, restated = [], []
        for idx in drawn_sets(y, prev, args.films, args.draws, rng):
            yy, pp, cc = y[idx], prob[idx], call[idx]
            kept.append(answers(yy, pp, cc))
            adjusted = at_prevalence(pp, prev, reference[idx])
            restated.append(answers(yy, adjusted, cc))
        row = {"as_calibrated": summarise(kept), "restated": summarise(restated)}
        report["by_prevalence"][str(prev)] = row
        a, b = row["as_calibrated"], row["restated"]
        log.info("prevalence %.3f: ECE %.4f -> %.4f; mean P %.3f -> %.3f; wrong with LOW %.1f -> %.1f of %d",
                 prev, a["ece"]["mean"], b["ece"]["mean"], a["mean_p"]["mean"], b["mean_p"]["mean"],
                 a["wrong_low"]["mean"], b["wrong_low"]["mean"], args.films)
    report["command"] = command_line("experiments/prevalence_check.py", argv)
    write_json(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
