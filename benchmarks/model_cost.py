#!/usr/bin/env python
"""Prediction cost of candidate checkpoints (ensembles included) against the shipped model, side by side.

    python benchmarks/model_cost.py --candidate runs/ens.pth [--candidate other.pth ...]

Model-only throughput (forward pass with logits and gate features, as ``pneumoscan predict`` runs it)
on real 224 px films, at batch 1 (one film, the latency a clinician waits for) and at batch 16 (a
folder), for each backend in ``--backends``. The checkpoints take turns for ``--rounds`` rounds so
that load from other processes falls on all of them alike; the median round is reported, and each
candidate's cost as a multiple of the shipped model's on the same backend and batch (issue 7 allows
at most 2x). Decoding, the gate and the scope classifier cost the same per film for every model
(about 1 ms, docs/scope.md) and are left out. int8 models are calibrated on training images of
each checkpoint's own split.

Time members with distinct weights: ONNX Runtime merges identical subgraphs (common-subexpression
elimination), so an ensemble of copies of one model is timed as one member on the ONNX backends.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import SHARED_DATA, emit

from pneumoscan.backends import make_predictor
from pneumoscan.checkpoint import default_model_path, load_checkpoint
from pneumoscan.inference import list_inputs
from pneumoscan.preprocess import decode_image, resize_gray


def images_per_s(predictor, images: torch.Tensor, batch_size: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(images), batch_size):
        predictor.outputs(images[i:i + batch_size], batch_size=batch_size)
    return len(images) / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidate", action="append", required=True, help="a checkpoint to compare (repeatable)")
    p.add_argument("--data_dir", default=str(SHARED_DATA / "chest_xray"), help="int8 calibration data")
    p.add_argument("--backends", default="torch,onnx-int8")
    p.add_argument("--images", type=int, default=32, help="films timed per checkpoint, backend and batch size")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    paths = {"shipped": str(default_model_path()), **{Path(c).name: c for c in args.candidate}}
    ckpts = {name: load_checkpoint(path) for name, path in paths.items()}
    sizes = {ckpt["input_spec"]["image_size"] for ckpt in ckpts.values()}
    if len(sizes) > 1:
        p.error(f"the checkpoints take different input sizes {sorted(sizes)}; compare models of one size")
    size = sizes.pop()
    files = list_inputs(Path(args.data_dir) / "train" / "NORMAL")[: args.images]
    films = torch.from_numpy(np.stack([resize_gray(decode_image(f, size).gray, size)
                                       for f in files]))
    backends = args.backends.split(",")
    with tempfile.TemporaryDirectory() as cache:
        predictors = {(name, b): make_predictor(ckpt, "cpu", b, calibration_dir=args.data_dir, cache_dir=cache)
                      for name, ckpt in ckpts.items() for b in backends}
        for predictor in predictors.values():
            predictor.outputs(films[:16], batch_size=16)  # warm-up
        speeds: dict[tuple, list[float]] = {(*key, bs): [] for key in predictors for bs in (1, 16)}
        for _ in range(args.rounds):
            for (name, b), predictor in predictors.items():
                for bs in (1, 16):
                    speeds[(name, b, bs)].append(images_per_s(predictor, films, bs))
    rows = []
    for (name, b, bs), values in speeds.items():
        median = statistics.median(values)
        base = statistics.median(speeds[("shipped", b, bs)])
        rows.append({"checkpoint": name, "path": paths[name], "backend": b, "batch_size": bs,
                     "img_per_s_median": median, "img_per_s_best": max(values), "cost_vs_shipped": base / median})
    table = "\n".join(f"{r['checkpoint']:<28} {r['backend']:<10} batch {r['batch_size']:>2}: "
                      f"{r['img_per_s_median']:6.1f} img/s, cost x{r['cost_vs_shipped']:.2f} of shipped"
                      for r in rows)
    emit({"images": len(films), "rounds": args.rounds, "rows": rows}, table, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
