#!/usr/bin/env python
"""The detail check (``gate.detail_ratio``): the floor from a checkpoint's training films, and how many
films of each set fall below it.

The floor is the training films' 0.1 % quantile of the model input's fine detail; a result below it is
answered with a "low detail" warning, and a refusal's reason says that the detail was lost. Measured on
the validation films (never in the floor), their processed copies (``inuse_folders.py``), the full-size
originals, dev_shift by folder and the generated non-radiographs, and on copies of the validation films
changed in memory (``VARIANTS``: resolution loss by several methods, with and without JPEG or noise after
it, blur), which show what the floor does not see. ``--store`` writes the floor into the
checkpoint's gate (nothing else changes).

    cd experiments && PYTHONPATH=. python gate_detail.py --data_dir ../../shared/data/chest_xray \\
        --folder /tmp/inuse/plain --folder /tmp/inuse/lowres_25 ... --json ../docs/gate/gate_detail.json
"""

from __future__ import annotations

import argparse
import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from scope_data import decoded_arrays, store_gate_entries

from pneumoscan.checkpoint import default_model_path, input_spec, load_checkpoint
from pneumoscan.cli import configure_logging
from pneumoscan.data import split_from_config
from pneumoscan.gate import DETAIL_QUANTILE, OutOfScopeGate, detail_ratio
from pneumoscan.inference import list_inputs
from pneumoscan.results import command_line, write_json
from pneumoscan.scope_report import wilson_interval

log = logging.getLogger("pneumoscan.gate_detail")


def _resized(a: np.ndarray, factor: float, up=Image.BILINEAR, down=Image.BILINEAR) -> Image.Image:
    img = Image.fromarray(a)
    small = img.resize((max(round(img.width * factor), 1), max(round(img.height * factor), 1)), down)
    return small.resize(img.size, up)


def _jpeg(img: Image.Image, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))


def _noisy(img: Image.Image, sigma: float, seed: int) -> np.ndarray:
    a = np.asarray(img, np.float32) + np.random.default_rng(seed).normal(0, sigma, (img.height, img.width))
    return np.clip(np.round(a), 0, 255).astype(np.uint8)


# Copies of the model-input films: which kinds of lost detail the floor sees, and which it does not.
VARIANTS = {
    "25 %, bilinear down and up": lambda a, i: np.asarray(_resized(a, 0.25)),
    "25 %, bicubic": lambda a, i: np.asarray(_resized(a, 0.25, Image.BICUBIC, Image.BICUBIC)),
    "25 %, enlarged by nearest neighbour (blocky)": lambda a, i: np.asarray(_resized(a, 0.25, Image.NEAREST)),
    "25 %, then JPEG q30": lambda a, i: _jpeg(_resized(a, 0.25), 30),
    "25 %, then JPEG q10": lambda a, i: _jpeg(_resized(a, 0.25), 10),
    "25 %, then noise (sigma 3 grey levels)": lambda a, i: _noisy(_resized(a, 0.25), 3.0, i),
    "25 %, then unsharp mask": lambda a, i: np.asarray(_resized(a, 0.25).filter(ImageFilter.UnsharpMask(2, 150))),
    "50 %, bilinear": lambda a, i: np.asarray(_resized(a, 0.5)),
    "Gaussian blur, radius 1": lambda a, i: np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(1))),
    "Gaussian blur, radius 2": lambda a, i: np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(2))),
}


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
    val = splits.val.images.numpy()
    report["sets"]["validation films"] = below(detail_ratio(val).numpy(), floor)
    for name, change in VARIANTS.items():
        changed = np.stack([change(a, i) for i, a in enumerate(val)])
        report["sets"][f"validation films, {name}"] = below(detail_ratio(changed).numpy(), floor)
    for folder in args.folder:
        pixels = decoded_arrays(list_inputs(Path(folder)), spec)["pixels"]
        report["sets"][folder] = below(detail_ratio(pixels).numpy(), floor)
    for name, r in report["sets"].items():
        log.info("%-50s %4d / %4d below the floor %.4f (median %.4f)", name, r["below"], r["n"], floor, r["median"])
    if args.store:
        store_gate_entries(ckpt, model_path, min_detail=floor, detail_quantile=gate.detail_quantile)
    report["command"] = command_line("experiments/gate_detail.py", argv)
    write_json(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
