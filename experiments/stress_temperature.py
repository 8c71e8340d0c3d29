#!/usr/bin/env python
"""Does a temperature fitted also on processed copies of the films hold better under processing changes?

The shipped temperature is fitted on the plain validation films. Here, for one checkpoint on its own
validation split, cross-fitted over 5 patient groups (as ``kfold_eval.py --single``): for each group, the
temperature is fitted on the *other* groups' films, either plain only (the shipped recipe) or plain pooled
with their stress copies (histogram equalisation, JPEG q10, 25 % resolution; ``kfold_eval.STRESS``), and
the threshold is then set on the other groups' plain films at that temperature (sensitivity >= 0.95).
Also *leave one stress out*: pooled with the two other stress copies only, so the number for a stress
comes from a temperature that never saw that change. Counted on the held group, plain and each stress
copy: 15-bin ECE, sensitivity and specificity, films answered with risk LOW (the seed's rule on the
calibrated probabilities, ``inference.risk_level``) and wrong answers with risk LOW. The model only:
no scope checks (``pneumoscan evaluate`` counts those in use).

    cd experiments && PYTHONPATH=. python stress_temperature.py --data_dir ../../shared/data/chest_xray \\
        --json ../docs/cv/stress_temperature_v21.json
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch
from kfold_eval import STRESS, stressed

from pneumoscan.calibration import calibrated_probs, fit_temperature, positive_probability
from pneumoscan.checkpoint import default_model_path, input_spec, load_checkpoint
from pneumoscan.cli import configure_logging
from pneumoscan.cv import deal_patients
from pneumoscan.data import split_from_config
from pneumoscan.inference import RISK_LOW, normalized_entropy, risk_level
from pneumoscan.metrics import expected_calibration_error, threshold_for_sensitivity
from pneumoscan.predict import Predictor
from pneumoscan.results import command_line, write_json

log = logging.getLogger("pneumoscan.stress_temperature")
TARGET = 0.95


def recipes() -> dict[str, list[str]]:
    """Which copies each temperature is fitted on (always with the plain films)."""
    names = list(STRESS)
    out = {"plain": [], "pooled": names}
    out.update({f"pooled_without_{s}": [n for n in names if n != s] for s in names})
    return out


def counts(y: np.ndarray, logits: torch.Tensor, t: float, thr: float) -> dict:
    """What the held films get at temperature ``t`` and threshold ``thr``."""
    probs = calibrated_probs(logits, t)
    p = probs[:, 1].numpy()
    pred = p >= thr
    label = pred.astype(int)
    low = np.array([risk_level(float(probs[i, label[i]]), normalized_entropy(probs[i])) == RISK_LOW
                    for i in range(len(y))])
    return {"n": len(y), "tp": int((pred & (y == 1)).sum()), "tn": int((~pred & (y == 0)).sum()),
            "pos": int((y == 1).sum()), "neg": int((y == 0).sum()), "low": int(low.sum()),
            "low_wrong": int((low & (pred != (y == 1))).sum()), "probs": p.tolist()}


def summarise(y: np.ndarray, parts: list[dict]) -> dict:
    """Pooled over the held groups (each part: one group's films, in the order of ``order``)."""
    tot = {k: sum(p[k] for p in parts) for k in ("n", "tp", "tn", "pos", "neg", "low", "low_wrong")}
    probs = np.concatenate([p["probs"] for p in parts])
    return {"sensitivity": tot["tp"] / tot["pos"], "specificity": tot["tn"] / tot["neg"],
            "ece": expected_calibration_error(y, probs), "answered_low": tot["low"], "wrong_low": tot["low_wrong"],
            "n": tot["n"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--model_path", default=None, help="checkpoint (default: the shipped model)")
    p.add_argument("--cache_dir", default="")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    configure_logging()
    t0 = time.time()
    ckpt = load_checkpoint(args.model_path or default_model_path())
    val = split_from_config(ckpt["config"], args.data_dir, input_spec(ckpt).image_size, args.cache_dir).val
    pred = Predictor.from_checkpoint(ckpt, "cpu")
    logits = {"plain": pred.logits(val.images)}
    for name, fn in STRESS.items():
        logits[name] = pred.logits(stressed(val.images, fn))
    labels = val.labels
    groups = deal_patients(list(val.patients))
    report: dict = {"model_version": ckpt.get("model_version"), "films": len(labels),
                    "patients": len(set(val.patients)), "stored_temperature": ckpt.get("temperature"),
                    "recipes": {}}
    order = np.concatenate([np.flatnonzero(groups == g) for g in np.unique(groups)])
    y = labels.numpy()[order]
    for recipe, copies in recipes().items():
        parts: dict[str, list[dict]] = {k: [] for k in logits}
        temps = []
        for g in np.unique(groups):
            fit, held = groups != g, groups == g
            pooled = torch.cat([logits["plain"][fit], *[logits[c][fit] for c in copies]])
            t = fit_temperature(pooled, labels[fit].repeat(1 + len(copies)))
            thr = threshold_for_sensitivity(labels[fit].numpy(), positive_probability(logits["plain"][fit], t), TARGET)
            temps.append(t)
            for k, lg in logits.items():
                parts[k].append(counts(labels.numpy()[held], lg[held], t, thr))
        report["recipes"][recipe] = {"fitted_on": ["plain", *copies], "temperatures": temps,
                                     **{k: summarise(y, v) for k, v in parts.items()}}
        r = report["recipes"][recipe]
        log.info("%-26s T %s | %s", recipe, " ".join(f"{t:.3f}" for t in temps),
                 " | ".join(f"{k} ECE {r[k]['ece']:.4f} LOW {r[k]['answered_low']} wrong-LOW {r[k]['wrong_low']}"
                            for k in logits))
    report["seconds"] = time.time() - t0
    report["command"] = command_line("experiments/stress_temperature.py", argv)
    write_json(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
