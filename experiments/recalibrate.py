#!/usr/bin/env python
"""Refit a checkpoint's temperature, operating threshold and out-of-scope gate, as training does.

For a checkpoint trained elsewhere (the shipped model was trained on a GPU in bf16, and before
the gate existed): rebuilds its own patient-level split from its config, runs the same
``finalize`` step as ``pneumoscan train`` in float32 here, and writes the checkpoint back
atomically with the validation report as JSON.

    python experiments/recalibrate.py --model_path src/pneumoscan/weights/pneumoscan-v2.pth \
        --json docs/model/recalibration.json
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

from pneumoscan.calibration import temperature_text
from pneumoscan.checkpoint import format_version, load_checkpoint, save_checkpoint
from pneumoscan.cli import configure_logging
from pneumoscan.config import TrainConfig
from pneumoscan.data import prepare_data
from pneumoscan.predict import Predictor
from pneumoscan.results import write_json
from pneumoscan.train import finalize

log = logging.getLogger("pneumoscan.recalibrate")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True)
    p.add_argument("--data_dir", default="../shared/data/chest_xray")
    p.add_argument("--json", required=True, help="write the calibration and validation report here")
    args = p.parse_args()
    configure_logging()
    ckpt = load_checkpoint(args.model_path)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{**{k: v for k, v in ckpt["config"].items() if k in known}, "data_dir": args.data_dir})
    splits = prepare_data(cfg.data_dir, cfg.image_size, cfg.val_fraction, cfg.min_val_images, cfg.seed)
    final = finalize(Predictor.from_checkpoint(ckpt, "cpu"), splits, cfg)
    log.info("temperature %s -> %s, threshold %s -> %.4f", ckpt.get("temperature"),
             temperature_text(final["temperature"], 4), ckpt.get("threshold"), final["threshold"])
    ckpt.pop("calibration_bias", None)  # a temperature alone now: a site's earlier intercept must not stay
    ckpt.update(temperature=final["temperature"], threshold=final["threshold"], ood_gate=final["ood_gate"],
                metrics=final["metrics_summary"])
    ckpt["format_version"] = format_version(ckpt)  # of what it holds now: may be lower than before (no intercept)
    save_checkpoint(ckpt, args.model_path)
    write_json({k: v for k, v in final.items() if k != "ood_gate"}, args.json)
    log.info("written %s and %s", args.model_path, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
