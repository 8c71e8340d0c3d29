#!/usr/bin/env python
"""The detail check (``gate.detail_ratio``): the floor from a checkpoint's training films, and how many
films of each set fall below it.

The floor is the training films' 0.1 % quantile of the model input's fine detail; a result below it is
answered with a "low detail" warning, and a refusal's reason says that the detail was lost. Measured on
the validation films (never in the floor), their processed copies (``inuse_folders.py``), the full-size
originals, dev_shift by folder and the generated non-radiographs. ``--store`` writes the floor into the
checkpoint's gate (nothing else changes).

    cd experiments && PYTHONPATH=. python gate_detail.py --data_dir ../../shared/data/chest_xray \\
        --folder /tmp/inuse/plain --folder /tmp/inuse/lowres_25 ... --json ../docs/gate/gate_detail.json
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from pneumoscan.checkpoint import default_model_path, input_spec, load_checkpoint, save_checkpoint
from pneumoscan.cli import configure_logging
from pneumoscan.data import split_from_config
from pneumoscan.gate import DETAIL_QUANTILE, OutOfScopeGate, detail_ratio
from pneumoscan.inference import list_inputs
from pneumoscan.preprocess import decode_image
from pneumoscan.results import command_line, write_json
from pneumoscan.scope_report import wilson_interval

log = logging.getLogger("pneumoscan.gate_detail")


def folder_pixels(folder: Path, spec) -> np.ndarray:
    """Model inputs of a folder's images, decoded as inference decodes them."""
    return np.stack([spec.pixels(decode_image(f, spec.image_size).gray) for f in list_inputs(folder)])


def below(ratios: np.ndarray, floor: float) -> dict:
    k, n = int((ratios < floor).sum()), len(ratios)
    return {"below": k, "n": n, "rate": k / n, "ci95": list(wilson_interval(k, n)), "median": float(np.median(ratios))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="the training data (train/NORMAL, train/PNEUMONIA)")
    p.add_argument("--model_path", default=None, help="checkpoint (default: the shipped model)")
    p.add_argument("--folder", action="append", default=[], help="a folder of images to measure (repeatable)")
    p.add_argument("--cache_dir", default="")
    p.add_argument("--json", required=True)
    p.add_argument("--store", action="store_true", help="write the floor into the checkpoint's gate")
    args = p.parse_args(argv)
    configure_logging()
    model_path = args.model_path or str(default_model_path())
    ckpt = load_checkpoint(model_path)
    spec = input_spec(ckpt)
    splits = split_from_config(ckpt["config"], args.data_dir, spec.image_size, args.cache_dir)
    gate = OutOfScopeGate.from_dict(ckpt["ood_gate"])
    floor = gate.fit_detail(splits.train.images)
    report: dict = {"model_path": model_path, "model_version": ckpt.get("model_version"), "floor": floor,
                    "quantile": DETAIL_QUANTILE, "training_films": len(splits.train), "sets": {}}
    report["sets"]["validation films"] = below(detail_ratio(splits.val.images).numpy(), floor)
    for folder in args.folder:
        report["sets"][folder] = below(detail_ratio(folder_pixels(Path(folder), spec)).numpy(), floor)
    for name, r in report["sets"].items():
        log.info("%-50s %4d / %4d below the floor %.4f (median %.4f)", name, r["below"], r["n"], floor, r["median"])
    if args.store:
        ckpt["ood_gate"] = {**ckpt["ood_gate"], "min_detail": floor}
        save_checkpoint(ckpt, model_path)
        log.info("detail floor %.4f stored in %s", floor, model_path)
    report["command"] = command_line("experiments/gate_detail.py", argv)
    write_json(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
