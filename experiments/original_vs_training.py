#!/usr/bin/env python
"""Do full-size originals reach the model as the training films did? (docs/experiments.md)

The training films are the data set's 224 px stretch-resized copies; the hidden test films arrive at
full size. For each of the 240 originals in ``fullres_sample/`` (training patients, so the AUROCs here
say nothing about accuracy), this compares the array our decoding makes with the data set's own 224 px
file, and the shipped model's calibrated P(PNEUMONIA) on both; other resampling filters for contrast.

    python experiments/original_vs_training.py --data_root ../shared/data
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pneumoscan.calibration import positive_probability
from pneumoscan.checkpoint import default_model_path, load_checkpoint
from pneumoscan.cli import configure_logging
from pneumoscan.metrics import auroc
from pneumoscan.predict import Predictor
from pneumoscan.preprocess import load_image, open_image

log = logging.getLogger("pneumoscan.original_vs_training")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_root", required=True, help="folder holding fullres_sample/ and chest_xray/train/")
    p.add_argument("--model_path", default="", help="a checkpoint (default: the shipped model)")
    args = p.parse_args(argv)
    configure_logging(None)
    root = Path(args.data_root)
    ckpt = load_checkpoint(args.model_path or default_model_path())
    pred = Predictor.from_checkpoint(ckpt)
    size = pred.spec.image_size
    variants: dict[str, list[np.ndarray]] = {k: [] for k in ("pneumoscan", "full decode + bicubic",
                                                               "full decode + lanczos", "data set 224 px")}
    labels = []
    for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
        for original in sorted((root / "fullres_sample" / cls).iterdir()):
            full = open_image(original)
            variants["pneumoscan"].append(load_image(original, size))
            variants["full decode + bicubic"].append(np.asarray(full.resize((size, size), Image.BICUBIC)))
            variants["full decode + lanczos"].append(np.asarray(full.resize((size, size), Image.LANCZOS)))
            variants["data set 224 px"].append(load_image(root / "chest_xray" / "train" / cls / original.name, size))
            labels.append(label)
    y = np.array(labels)
    films = {name: np.stack(arrays) for name, arrays in variants.items()}
    probs = {name: positive_probability(pred.logits(torch.from_numpy(a)), pred.temperature, pred.bias)
             for name, a in films.items()}
    ref, p_ref = films["data set 224 px"].astype(np.float32), probs["data set 224 px"]
    for name, prob in probs.items():
        a = films[name].astype(np.float32)
        d = np.abs(prob - p_ref)
        labels_equal = int(((prob >= ckpt["threshold"]) == (p_ref >= ckpt["threshold"])).sum())
        log.info("%-22s mean |pixel diff| %.2f (bias %+.2f); P(PNEUMONIA) vs data set film: mean |d| %.4f, max %.4f; "
                 "labels equal %d/%d; AUROC %.4f", name, np.abs(a - ref).mean(), (a - ref).mean(),
                 d.mean(), d.max(), labels_equal, len(y), auroc(y, prob))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
