#!/usr/bin/env python
"""Wall time and validation quality of ``pneumoscan train --preset fast``, from a cold start.

Runs the real CLI in a subprocess with an empty decode cache, so the time includes
reading and decoding every image, training, calibration and writing all outputs.

    python benchmarks/fast_preset.py --data_dir ../shared/data/chest_xray
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import SHARED_DATA, emit


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=str(SHARED_DATA / "chest_xray"))
    p.add_argument("--output_dir", help="keep the run here (default: a temporary folder)")
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.output_dir or Path(tmp) / "out")
        cmd = [sys.executable, "-m", "pneumoscan", "train", "--preset", "fast", "--data_dir", args.data_dir,
               "--output_dir", str(out), "--cache_dir", str(Path(tmp) / "cold_cache")]
        t0 = time.time()
        subprocess.run(cmd, check=True)
        wall = time.time() - t0
        res = json.loads((out / "training_results.json").read_text())
    m = res["validation"]["at_threshold"]["metrics"]
    result = {
        "command": " ".join(cmd[1:]), "wall_s": wall, "epochs_run": len(res["history"]),
        "stop_reason": res["stop_reason"], "timings_s": res["timings_s"],
        "val_auroc": m["auroc"], "val_sensitivity": m["sensitivity"], "val_specificity": m["specificity"],
        "threshold": res["calibration"]["threshold"],
    }
    emit(result, f"fast preset: {wall / 60:.1f} min wall (goal <= 10), validation AUROC {m['auroc']['value']:.4f} "
         f"[{m['auroc']['ci_low']:.4f}, {m['auroc']['ci_high']:.4f}]", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
