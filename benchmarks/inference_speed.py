#!/usr/bin/env python
"""Whole-process prediction throughput on real full-size originals, every candidate side by side in one run.

    python benchmarks/inference_speed.py                       # 240 originals of ../shared/data/fullres_sample
    python benchmarks/inference_speed.py --baseline_src /tmp/old/src   # also an older checkout's predict

Each candidate is one fresh process predicting the whole folder (imports, model load, decoding,
out-of-scope gate, forward pass, JSON output), timed from start to exit, run in turn (never two at
once). The naive script decodes each file fully with PIL, stretch-resizes it and runs the same
weights in eager fp32 one image at a time. The machine's compute limit for the 6.6-GFLOP model is
its measured fp32 matmul rate divided by 6.6 GFLOP. Labels of each candidate are compared with
the fp32 torch path (same files, the stored threshold).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import SHARED_DATA, emit

MODEL_GFLOP = 6.6  # MedicalCNN at 224 px, one image, forward (multiply-adds counted as 2)

NAIVE = r"""
import sys, time
from pathlib import Path
import numpy as np, torch
from PIL import Image
from pneumoscan.checkpoint import default_model_path, load_checkpoint, model_from_checkpoint
ckpt = load_checkpoint(default_model_path())
model = model_from_checkpoint(ckpt).eval()
spec, t = ckpt["input_spec"], ckpt["temperature"]
out = {}
for f in sorted(p for p in Path(sys.argv[1]).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")):
    img = Image.open(f).convert("L").resize((spec["image_size"],) * 2, Image.BILINEAR)
    x = (torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0) - spec["mean"]) / spec["std"]
    with torch.no_grad():
        p = torch.softmax(model(x.expand(1, spec["in_channels"], -1, -1)).double() / t, -1)[0, 1].item()
    out[str(f)] = "PNEUMONIA" if p >= ckpt["threshold"] else "NORMAL"
import json; Path(sys.argv[2]).write_text(json.dumps(out))
"""


def matmul_gflops(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def labels_of(path: Path) -> dict[str, str]:
    if path.suffix == ".jsonl":
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        return {o["image_path"]: o.get("prediction", "refused") for o in lines}
    doc = json.loads(path.read_text())
    if "results" not in doc:  # the naive script's {path: label}
        return doc
    return {**{r["image_path"]: r["prediction"] for r in doc["results"]},
            **{e["image_path"]: "refused" for e in doc["errors"]}}


def timed(cmd: list[str], env: dict | None = None) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image_dir", default=str(SHARED_DATA / "fullres_sample"))
    p.add_argument("--baseline_src", help="src/ of an older checkout whose `pneumoscan predict` to time too")
    p.add_argument("--backends", default="torch,onnx,onnx-int8", help="comma-separated --backend values to time")
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args()
    files = sorted(q for q in Path(args.image_dir).rglob("*") if q.suffix.lower() in (".jpg", ".jpeg", ".png"))
    tmp = Path(tempfile.mkdtemp(prefix="pneumoscan-speed-"))
    predict = [sys.executable, "-m", "pneumoscan", "predict", "--image_dir", args.image_dir]

    candidates: list[tuple[str, list[str], dict | None, Path]] = []
    candidates.append(("naive script (PIL full decode, eager fp32, one image at a time)",
                       [sys.executable, "-c", NAIVE, args.image_dir, str(tmp / "naive.json")], None,
                       tmp / "naive.json"))
    if args.baseline_src:
        env = {**os.environ, "PYTHONPATH": args.baseline_src}
        candidates.append((f"pneumoscan predict from {args.baseline_src}", [*predict, "--output_path",
                           str(tmp / "baseline.json")], env, tmp / "baseline.json"))
    candidates.append(("pneumoscan predict --backend torch --decode_workers 0",
                       [*predict, "--backend", "torch", "--decode_workers", "0", "--output_path",
                        str(tmp / "torch0.json")], None, tmp / "torch0.json"))
    for backend in args.backends.split(","):
        name = f"{backend}.jsonl"
        candidates.append((f"pneumoscan predict --backend {backend} (decode in 2 threads, .jsonl)",
                           [*predict, "--backend", backend, "--output_path", str(tmp / name)], None, tmp / name))
    if "onnx-int8" in args.backends:  # build the int8 model once, outside the timed runs (a one-off per model)
        timed([*predict, "--backend", "onnx-int8", "--output_path", str(tmp / "warm.json")])

    gflops = matmul_gflops()
    limit = gflops / MODEL_GFLOP
    rows = []
    for label, cmd, env, out in candidates:
        seconds = timed(cmd, env)
        rows.append({"candidate": label, "seconds": seconds, "images_per_s": len(files) / seconds,
                     "share_of_compute_limit": len(files) / seconds / limit, "output": out})
    reference = labels_of(next(r["output"] for r in rows if "--backend torch (" in r["candidate"]))
    naive_rate = rows[0]["images_per_s"]
    for r in rows:
        labels = labels_of(r.pop("output"))
        common = [k for k in reference if k in labels]
        r["labels_equal_to_torch_fp32"] = sum(labels[k] == reference[k] for k in common) / max(len(common), 1)
        r["x_naive"] = r["images_per_s"] / naive_rate
    table = "\n".join(f"{r['candidate']:<78} {r['images_per_s']:6.1f} img/s  x{r['x_naive']:.2f} naive  "
                      f"{100 * r['share_of_compute_limit']:5.1f}% of limit  "
                      f"labels {100 * r['labels_equal_to_torch_fp32']:.1f}%" for r in rows)
    emit({"images": len(files), "matmul_gflops": gflops, "compute_limit_img_per_s": limit, "rows": rows},
         f"{len(files)} files; fp32 matmul {gflops:.0f} GFLOP/s -> compute limit {limit:.1f} img/s\n{table}",
         args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
