#!/usr/bin/env python
"""Store int8 activation ranges in a checkpoint, so that its onnx-int8 backend builds without data.

    python experiments/int8_calibrate.py --model_path src/pneumoscan/weights/pneumoscan-v2.pth \
        --data_dir ../shared/data/chest_xray

Calibrates on 256 training images of the checkpoint's own split (its validation split, rebuilt
from the stored config, is left out), writes ``int8_calibration`` (recipe, image count, per-tensor
min/max) into the checkpoint and saves it in place; weights, temperature, threshold and gate are
untouched. Then checks that the int8 graph built from the stored ranges gives the same outputs as
one built from the images directly.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch

from pneumoscan.backends import OnnxPredictor
from pneumoscan.checkpoint import load_checkpoint, save_checkpoint
from pneumoscan.cli import configure_logging
from pneumoscan.export import calibration_images, calibration_ranges, onnx_model, quantize_int8, stored_ranges

log = logging.getLogger("pneumoscan.experiments.int8_calibrate")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--images", type=int, default=256)
    args = p.parse_args()
    configure_logging()
    ckpt = load_checkpoint(args.model_path)
    model = onnx_model(ckpt)
    images = calibration_images(ckpt, args.data_dir, args.images)
    from pneumoscan.export import INT8_RECIPE

    ckpt["int8_calibration"] = {"recipe": INT8_RECIPE, "images": len(images),
                                "ranges": calibration_ranges(model, images)}
    with tempfile.TemporaryDirectory() as tmp:
        a = quantize_int8(model, stored_ranges(ckpt), Path(tmp) / "stored.onnx")
        b = quantize_int8(onnx_model(ckpt), calibration_ranges(model, images), Path(tmp) / "direct.onnx")
        check = images[:32]
        la, lb = OnnxPredictor(a, ckpt).logits(check), OnnxPredictor(b, ckpt).logits(check)
        log.info("int8 from stored ranges vs from images: max |logit difference| %.2e", float((la - lb).abs().max()))
        if not torch.equal(la, lb):
            raise SystemExit("stored ranges do not reproduce the int8 graph")
    save_checkpoint(ckpt, args.model_path)
    log.info("stored %d activation ranges (%s) in %s", len(ckpt["int8_calibration"]["ranges"]), INT8_RECIPE,
             args.model_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
