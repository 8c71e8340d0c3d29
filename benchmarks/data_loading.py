#!/usr/bin/env python
"""Share of an epoch's wall time spent loading data (the 2nd epoch, after the decode cache is warm).

Trains the seed MedicalCNN for two epochs on a real subset and reads the per-epoch
timings the training loop records (data_time_s: batch indexing, uint8->float,
augmentation, normalisation; epoch_time_s: the whole epoch including validation).

    python benchmarks/data_loading.py --image_size 224 --per_class 300
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

from _common import SHARED_DATA, emit, subset

from pneumoscan.cli import train_main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=str(SHARED_DATA / "chest_xray"))
    p.add_argument("--per_class", type=int, default=300, help="images per class in the subset")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = subset(Path(args.data_dir), Path(tmp) / "data", args.per_class)
        out = Path(tmp) / "out"
        rc = train_main(["--data_dir", str(data), "--output_dir", str(out), "--epochs", "2",
                         "--image_size", str(args.image_size), "--cache_dir", str(Path(tmp) / "cache")])
        if rc != 0:
            raise SystemExit(f"training failed with exit code {rc}")
        rows = list(csv.DictReader(open(out / "history.csv")))
    second = rows[1]
    epoch, data_s, compute_s = (float(second[k]) for k in ("epoch_time_s", "data_time_s", "compute_time_s"))
    result = {"image_size": args.image_size, "train_images": int(2 * args.per_class * 0.85),
              "epoch2_wall_s": epoch, "epoch2_data_s": data_s, "epoch2_compute_s": compute_s,
              "data_share": data_s / epoch}
    emit(result, f"data loading: {data_s:.1f}s of {epoch:.1f}s = {100 * data_s / epoch:.1f}% of epoch 2 wall time "
         f"(goal < 10%)", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
