#!/usr/bin/env python
"""Training and prediction with 1 process and with torchrun's N processes, side by side in one run.

    python benchmarks/torchrun_speed.py --nproc 2

Training: the full training split at 64 px (MedicalCNN width 0.5), 2 epochs, batch 32 per
process, decoded images from a warm cache; the number compared is the mean training-epoch time
from `training_results.json` (`history[].epoch_time_s`, validation included). Prediction: the 240
full-size originals of fullres_sample with the shipped model, whole process wall time. On a
2-core machine two processes share the same cores, so no speed-up is expected here; the script
is for multi-GPU nodes as much as for this machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import SHARED_DATA, emit

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--data_dir", default=str(SHARED_DATA / "chest_xray"))
    p.add_argument("--image_dir", default=str(SHARED_DATA / "fullres_sample"))
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pneumoscan-torchrun-"))
    train = ["-m", "pneumoscan", "train", "--data_dir", args.data_dir, "--image_size", "64", "--width", "0.5",
             "--epochs", "2", "--batch_size", "32", "--cache_dir", str(tmp / "cache"), "--device", "cpu"]
    run([sys.executable, *train, "--output_dir", str(tmp / "warm"), "--epochs", "1"])  # fills the decode cache
    rows = {}
    for label, launcher in (("1 process", [sys.executable]),
                            (f"torchrun {args.nproc} processes", [*TORCHRUN, f"--nproc_per_node={args.nproc}"])):
        out = tmp / label.replace(" ", "_")
        wall = run([*launcher, *train, "--output_dir", str(out)])
        history = json.loads((out / "training_results.json").read_text())["history"]
        predict_wall = run([*launcher, "-m", "pneumoscan", "predict", "--image_dir", args.image_dir,
                            "--output_path", str(tmp / f"{label.replace(' ', '_')}.jsonl")])
        rows[label] = {"train_wall_s": wall, "mean_epoch_s": statistics.mean(h["epoch_time_s"] for h in history),
                       "val_auroc_last_epoch": history[-1]["val_auroc"], "predict_240_wall_s": predict_wall}
    one, many = rows["1 process"], rows[f"torchrun {args.nproc} processes"]
    emit({"nproc": args.nproc, "rows": rows},
         f"training epoch: {one['mean_epoch_s']:.1f} s (1 process) vs {many['mean_epoch_s']:.1f} s ({args.nproc}); "
         f"speed-up x{one['mean_epoch_s'] / many['mean_epoch_s']:.2f}. Prediction of 240 files: "
         f"{one['predict_240_wall_s']:.1f} s vs {many['predict_240_wall_s']:.1f} s, "
         f"x{one['predict_240_wall_s'] / many['predict_240_wall_s']:.2f}", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
