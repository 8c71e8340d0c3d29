#!/usr/bin/env python
"""Which scope classifier? Leave-one-source-out refusal rates of several variants at several refusal budgets.

For each variant (features, hidden units, weight decay), fits one classifier per held-out dev_shift
source (the other sources, the generated negatives and the model's training-split films in scope),
chooses its threshold on the validation films at each budget, and reports the share of the
held-out source refused (pixel check, distance gate and classifier together), per class; and the
refusal rate of full-size pediatric originals whose patients were left out of the fit entirely
(their 224 px copies too), in two folds by patient.

    python experiments/fit_scope.py ...   # once, to fill the feature cache (see its docstring)
    python experiments/scope_variants.py --corpus /tmp/scope_corpus --ood_dir /tmp/ood --json docs/scope/variants.json
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
from fit_scope import HELD_OUT_PEDIATRIC, Pipeline, rate
from scope_data import fit_gate, gate_fit_rows, load_all

from pneumoscan.checkpoint import default_model_path, load_checkpoint
from pneumoscan.cli import configure_logging
from pneumoscan.predict import Predictor
from pneumoscan.results import write_json
from pneumoscan.scope import pixel_features

log = logging.getLogger("pneumoscan.scope_variants")

# (name, feature columns, hidden units, weight decay)
VARIANTS = (
    ("linear, blocks + pixels, wd 1e-4", "all", 0, 1e-4),
    ("linear, blocks + pixels, wd 1e-3", "all", 0, 1e-3),
    ("linear, blocks + pixels, wd 1e-5", "all", 0, 1e-5),
    ("linear, blocks only, wd 1e-4", "blocks", 0, 1e-4),
    ("linear, pixels only, wd 1e-4", "pixels", 0, 1e-4),
    ("MLP 64, blocks + pixels, wd 1e-4", "all", 64, 1e-4),
)
BUDGETS = (0.004, 0.006, 0.008, 0.010)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_root", default="../shared/data")
    p.add_argument("--dev_shift", default="../shared/data/dev_shift")
    p.add_argument("--corpus", required=True)
    p.add_argument("--ood_dir", required=True)
    p.add_argument("--gate_quantile", type=float, default=0.999)
    p.add_argument("--only", help="run only the variants whose name contains this")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    configure_logging()
    ckpt = load_checkpoint(default_model_path())
    table = load_all(Predictor.from_checkpoint(ckpt, "cpu"), ckpt, Path(args.data_root), Path(args.dev_shift),
                     Path(args.corpus), Path(args.ood_dir))
    classes, sources = np.array(table.classes), np.array(table.sources)
    _, val_rows = gate_fit_rows(table)
    gate = fit_gate(table, args.gate_quantile)
    pipe = Pipeline(table, gate)
    full_x = pipe.x
    n_pixel = pixel_features(np.zeros((1, 224, 224), np.uint8)).shape[1]
    columns = {"all": slice(None), "blocks": slice(0, full_x.shape[1] - n_pixel),
               "pixels": slice(full_x.shape[1] - n_pixel, None)}
    never = pipe.mask(HELD_OUT_PEDIATRIC)
    dev = sorted({(c, s) for c, s in zip(classes, sources) if "/" in s})  # dev_shift sources are repositories
    results = []
    for name, cols, hidden, wd in VARIANTS:
        if args.only and args.only not in name:
            continue
        t0 = time.time()
        pipe.x = full_x[:, columns[cols]]
        refused = {b: {} for b in BUDGETS}
        for cls, source in dev:
            clf = pipe.train(~never & (sources != source), hidden, wd)
            rows = np.flatnonzero(sources == source)
            for b in BUDGETS:
                refused[b].setdefault(cls, []).append(pipe.verdicts(pipe.calibrate(clf, val_rows, b), rows)[0])
        ped = pipe.fullres_held_out(hidden, wd, BUDGETS)
        row = {"variant": name, "features": cols, "hidden": hidden, "weight_decay": wd,
               "seconds": round(time.time() - t0, 1), "budgets": {}}
        for b in BUDGETS:
            row["budgets"][str(b)] = {**{c: rate(np.concatenate(v)) for c, v in refused[b].items()},
                                      "pediatric_fullres_held_out": rate(ped[b])}
        results.append(row)
        log.info("%s: %s", name, {b: {c: f"{v['rate']:.3f}" for c, v in r.items()}
                                  for b, r in row["budgets"].items()})
    command = " ".join(["python experiments/scope_variants.py", *(sys.argv[1:] if argv is None else argv)])
    write_json({"gate_quantile": args.gate_quantile, "variants": results, "command": command}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
