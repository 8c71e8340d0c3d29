#!/usr/bin/env python
"""Run a list of training configurations on one data set and tabulate validation results.

Each run is an ordinary ``pneumoscan train`` run in OUT/NAME; the table (markdown and JSON)
gives patient-level validation AUROC, sensitivity and specificity at the calibrated
screening threshold, with 95% CIs, ECE before/after temperature scaling, epochs and
wall time. Used for docs/experiments.md; selection is on validation only.

    python experiments/model_search.py --data_dir ../shared/data/chest_xray --out runs/search \
        --grid gpu --minutes 1.4
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch

from pneumoscan.cli import configure_logging
from pneumoscan.config import TrainConfig
from pneumoscan.train import run_training

log = logging.getLogger("pneumoscan.search")

GRIDS = {
    "gpu": {
        "seed_light": {"arch": "medical_cnn", "augment": "light"},
        "res_se_light": {"arch": "medical_cnn_res_se", "augment": "light"},
        "res_se_strong": {"arch": "medical_cnn_res_se", "augment": "strong"},
        "seed_strong_focal": {"arch": "medical_cnn", "augment": "strong", "loss": "focal"},
        "res_strong": {"arch": "medical_cnn_res", "augment": "strong"},
    },
    "smoke": {
        "seed_light": {"arch": "medical_cnn", "augment": "light"},
        "res_se_strong": {"arch": "medical_cnn_res_se", "augment": "strong", "loss": "focal"},
    },
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--grid", choices=list(GRIDS), default="gpu")
    p.add_argument("--only", nargs="*", help="run only these names of the grid")
    p.add_argument("--minutes", type=float, default=1.5, help="training budget per run")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--patience", type=int, default=8)
    p.add_argument("--cache_dir", default="")
    args = p.parse_args(argv)
    out = Path(args.out)
    configure_logging(out / "search.log")
    rows = []
    for name, overrides in GRIDS[args.grid].items():
        if args.only and name not in args.only:
            continue
        cfg = TrainConfig(data_dir=args.data_dir, output_dir=str(out / name), epochs=args.epochs,
                          image_size=args.image_size, batch_size=args.batch_size, lr=args.lr,
                          patience=args.patience, max_train_minutes=args.minutes,
                          cache_dir=args.cache_dir, overwrite=True, **overrides)  # each call measures anew
        t0 = time.time()
        res = run_training(cfg)
        m = res["validation"]["at_threshold"]["metrics"]
        rows.append({
            "name": name, "overrides": overrides, "image_size": args.image_size,
            "epochs_run": len(res["history"]), "best_epoch": res["best_epoch"],
            "val_auroc": m["auroc"], "val_sensitivity": m["sensitivity"], "val_specificity": m["specificity"],
            "threshold": res["calibration"]["threshold"], "temperature": res["calibration"]["temperature"],
            "ece_before": res["calibration"]["ece_before"], "ece_after": res["calibration"]["ece_after"],
            "train_s": res["timings_s"]["training"], "wall_s": time.time() - t0,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
        })
        (out / "search.json").write_text(json.dumps(rows, indent=2))
    lines = ["| run | config | epochs (best) | val AUROC [95% CI] | sens @thr | spec @thr | thr "
             "| ECE before/after | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def ci(m):
            return f"{m['value']:.4f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"
        lines.append(f"| {r['name']} | {r['overrides']} | {r['epochs_run']} ({r['best_epoch']}) | "
                     f"{ci(r['val_auroc'])} | {ci(r['val_sensitivity'])} | {ci(r['val_specificity'])} | "
                     f"{r['threshold']:.3f} | {r['ece_before']:.3f}/{r['ece_after']:.3f} | {r['train_s']:.0f} |")
    (out / "search.md").write_text("\n".join(lines) + "\n")
    log.info("\n%s", "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
