#!/usr/bin/env python
"""Memory of `pneumoscan predict --output_path X.jsonl` on a large generated folder: constant, not growing.

    python benchmarks/jsonl_memory.py --n 100000

Builds a folder of ``n`` symbolic links to the real 224 px training JPEGs (1,000 per sub-folder),
then runs `pneumoscan predict --image_dir ... --output_path out.jsonl` in a subprocess and samples
its resident memory (VmRSS) and the output's line count twice a second. The model is a small
untrained MedicalCNN (64 px, width 0.25, no gate) so that 100,000 files take minutes: what is
measured is the pipeline's memory (listing, decoding ahead, writing), which does not depend on
the model. Reports RSS at each tenth of the run; a growing result list would show as a slope.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import SHARED_DATA, emit

from pneumoscan.checkpoint import model_payload, save_checkpoint
from pneumoscan.model import model_from_kwargs, model_kwargs
from pneumoscan.predict import InputSpec


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except OSError:
        return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pneumoscan-jsonl-"))
    sources = sorted((SHARED_DATA / "chest_xray" / "train").rglob("*.jpeg"))
    folder = tmp / "in"
    for i in range(args.n):
        sub = folder / f"{i // 1000:04d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True)
        (sub / f"{i:06d}_{sources[i % len(sources)].name}").symlink_to(sources[i % len(sources)])
    kw = model_kwargs("medical_cnn", 1, width=0.25)
    model = tmp / "tiny.pth"
    save_checkpoint(model_payload(model_from_kwargs(kw).eval(), arch="medical_cnn", model_kw=kw,
                                  spec=InputSpec(64, 0.5, 0.25, 1), config={}, model_version="tiny-untrained"),
                    model)
    out = tmp / "out.jsonl"
    cmd = [sys.executable, "-m", "pneumoscan", "predict", "--image_dir", str(folder), "--output_path", str(out),
           "--model_path", str(model), "--batch_size", "64", "--device", "cpu"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples = []
    while proc.poll() is None:
        rss = rss_mb(proc.pid)
        if rss is not None:
            samples.append((time.perf_counter() - t0, count_lines(out), rss))
        time.sleep(0.5)
    wall = time.perf_counter() - t0
    lines = count_lines(out)
    deciles = []
    for k in range(1, 11):
        target = args.n * k / 10
        at = next((s for s in samples if s[1] >= target), samples[-1])
        deciles.append({"files_done": at[1], "seconds": round(at[0], 1), "rss_mb": round(at[2], 1)})
    rss = [s[2] for s in samples if s[1] > 0]
    result = {"n": args.n, "exit_code": proc.returncode, "lines_written": lines, "wall_s": wall,
              "rss_mb_first_output": rss[0] if rss else None, "rss_mb_max": max(rss) if rss else None,
              "rss_mb_last": rss[-1] if rss else None, "by_tenth": deciles, "command": " ".join(cmd)}
    emit(result, f"{lines} of {args.n} lines in {wall:.0f} s; RSS {result['rss_mb_first_output']:.0f} MB at the "
                 f"first line, {result['rss_mb_last']:.0f} MB at the end, {result['rss_mb_max']:.0f} MB max",
         args.json)
    return 0 if lines == args.n and proc.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
