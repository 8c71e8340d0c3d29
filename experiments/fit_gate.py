#!/usr/bin/env python
"""Fit the out-of-scope gate of an existing checkpoint (one trained before the gate existed).

Rebuilds the checkpoint's own patient-level split, computes pooled features of the training
images (optionally a seeded subsample) and the validation images, fits the gate as
``pneumoscan train`` does at the end of training, and writes the checkpoint back atomically.

    python experiments/fit_gate.py --model_path src/pneumoscan/weights/pneumoscan-v1.pth
"""

from __future__ import annotations

import argparse
import logging

import torch

from pneumoscan.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from pneumoscan.cli import configure_logging
from pneumoscan.data import prepare_data
from pneumoscan.evaluate import predict_outputs, resolve_device
from pneumoscan.gate import OutOfScopeGate

log = logging.getLogger("pneumoscan.fit_gate")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True)
    p.add_argument("--data_dir", default="../shared/data/chest_xray")
    p.add_argument("--max_train", type=int, default=0, help="subsample this many training images (0: all)")
    args = p.parse_args()
    configure_logging()
    ckpt = load_checkpoint(args.model_path)
    cfg = ckpt["config"]
    splits = prepare_data(args.data_dir, ckpt["image_size"], cfg.get("val_fraction", 0.15),
                          cfg.get("min_val_images", 100), cfg.get("seed", 42))
    device = resolve_device("auto")
    model = model_from_checkpoint(ckpt).to(device)
    idx = torch.arange(len(splits.train))
    if args.max_train and args.max_train < len(idx):
        idx = torch.randperm(len(idx), generator=torch.Generator().manual_seed(0))[:args.max_train]
    norm, ch = ckpt["normalization"], ckpt["in_channels"]
    _, train_feats = predict_outputs(model, splits.train.images[idx], norm, ch, device)
    _, val_feats = predict_outputs(model, splits.val.images, norm, ch, device)
    gate = OutOfScopeGate.fit(train_feats, splits.train.labels[idx], val_feats)
    ckpt["ood_gate"] = gate.to_dict()
    save_checkpoint(ckpt, args.model_path)
    log.info("gate fitted on %d training and %d validation images: threshold %.2f; written to %s",
             len(idx), len(splits.val), gate.threshold, args.model_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
