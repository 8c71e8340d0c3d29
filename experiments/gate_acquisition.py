#!/usr/bin/env python
"""Does a feature-distance gate fitted on acquisition-augmented training films refuse fewer valid films
after a processing change, without losing its catches? (docs/experiments.md, "A gate that knows
acquisition changes")

Two gates for the shipped model, both ``gate.OutOfScopeGate.fit`` at the stored quantile, with per-block
scales and the limit set on the plain validation films:
- ``baseline``: class means and covariance from the plain training films (what ``fit_scope.py`` stores);
- ``candidate``: the same from the plain training films plus ``--copies`` copies of each passed through
  ``augment.augment_batch(..., "acquisition")`` (the augmentation v2.0 was fine-tuned with; seeds 0, 1, ...).

Measured for each, with the distance stage alone (share of inputs whose score is above the limit):
validation films plain and after the three stress changes of ``kfold_eval.py`` (none of them is in the
augmentation), the full-size originals, dev_shift by folder, the generated non-radiographs
(``ood_corpus.py``) and the scope corpus by class (``scope_corpus.py``).

    python experiments/ood_corpus.py --out /tmp/ood
    python experiments/scope_corpus.py --out /tmp/scope_corpus
    python experiments/gate_acquisition.py --ood_dir /tmp/ood --corpus /tmp/scope_corpus \\
        --json docs/gate/gate_acquisition.json
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from kfold_eval import STRESS, stressed
from scope_data import augmented_features, corpus_table, dev_shift_table, ood_table, pediatric_tables, pneumonia_labels

from pneumoscan.checkpoint import default_model_path, load_checkpoint
from pneumoscan.cli import configure_logging
from pneumoscan.gate import OutOfScopeGate
from pneumoscan.predict import Predictor
from pneumoscan.results import write_json
from pneumoscan.scope_report import wilson_interval

log = logging.getLogger("pneumoscan.gate_acquisition")


def share(scores: torch.Tensor, limit: float) -> dict:
    k, n = int((scores > limit).sum()), int(scores.numel())
    return {"above": k, "n": n, "rate": k / n if n else float("nan"), "ci95": list(wilson_interval(k, n))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=None, help="checkpoint (default: the shipped model)")
    p.add_argument("--data_root", default="../shared/data")
    p.add_argument("--dev_shift", default="../shared/data/dev_shift")
    p.add_argument("--ood_dir", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--copies", type=int, default=2)
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    configure_logging()
    t0 = time.time()
    model_path = args.model_path or str(default_model_path())
    ckpt = load_checkpoint(model_path)
    predictor = Predictor.from_checkpoint(ckpt, "cpu")
    quantile = float(ckpt["ood_gate"]["quantile"])
    ped_train, ped_val, fullres = pediatric_tables(predictor, ckpt, Path(args.data_root))
    labels = pneumonia_labels(ped_train)
    train_feats, val_feats = ped_train.block_features(), ped_val.block_features()

    log.info("features of %d acquisition-augmented copies of %d training films", args.copies, len(ped_train))
    aug = augmented_features(predictor, ped_train, args.copies)
    cand_feats = [torch.cat([f, a]) for f, a in zip(train_feats, aug)]
    gates = {
        "baseline": OutOfScopeGate.fit(train_feats, labels, val_feats, quantile=quantile),
        "candidate": OutOfScopeGate.fit(cand_feats, labels.repeat(args.copies + 1), val_feats, quantile=quantile),
    }
    stored = float(ckpt["ood_gate"]["threshold"])
    log.info("limits: stored %.4f, baseline refit %.4f, candidate %.4f", stored, gates["baseline"].threshold,
             gates["candidate"].threshold)

    sets: dict[str, tuple[list[torch.Tensor], str]] = {"val_plain": (val_feats, "in_scope"),
                                                      "fullres_originals": (fullres.block_features(), "in_scope")}
    val_images = torch.from_numpy(ped_val.pixels)
    for name, fn in STRESS.items():
        sets[f"val_{name}"] = (predictor.outputs(stressed(val_images, fn)).features, "in_scope")
    dev = dev_shift_table(predictor, Path(args.dev_shift))
    corpus = corpus_table(predictor, Path(args.corpus))
    for table, prefix in ((dev, "dev_shift_"), (corpus, "corpus_")):
        classes = np.array(table.classes)
        for c in sorted(set(classes)):
            sets[prefix + c] = (table.select(classes == c).block_features(), c)
    sets["generated_non_radiographs"] = (ood_table(predictor, Path(args.ood_dir)).block_features(), "non_radiograph")

    report: dict = {"model_path": model_path, "copies": args.copies, "quantile": quantile, "stored_limit": stored,
                    "limits": {k: g.threshold for k, g in gates.items()},
                    "scales": {k: g.scales for k, g in gates.items()}, "sets": {}}
    for name, (feats, cls) in sets.items():
        row = {"class": cls, **{k: share(g.scores(feats), g.threshold) for k, g in gates.items()}}
        report["sets"][name] = row
        log.info("%-34s n %4d  baseline %5.1f %%  candidate %5.1f %%", name, row["baseline"]["n"],
                 100 * row["baseline"]["rate"], 100 * row["candidate"]["rate"])
    command = " ".join(["python experiments/gate_acquisition.py", *(sys.argv[1:] if argv is None else argv)])
    report.update(command=command, seconds=time.time() - t0)
    write_json(report, args.json)
    log.info("written to %s (%.0f s)", args.json, time.time() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
