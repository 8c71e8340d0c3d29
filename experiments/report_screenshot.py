#!/usr/bin/env python
"""The evaluation report of a model on its own patient-level validation split, and its screenshot.

Links the validation images (rebuilt from the checkpoint's config) into NORMAL/ and PNEUMONIA/,
runs ``pneumoscan evaluate --report``, and renders the page in headless Chromium.

    python experiments/report_screenshot.py --out docs/report
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from pneumoscan.browser import screenshot
from pneumoscan.checkpoint import default_model_path, load_checkpoint
from pneumoscan.cli import configure_logging, evaluate_main
from pneumoscan.data import split_from_config
from pneumoscan.predict import CLASS_NAMES


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=None)
    p.add_argument("--data_dir", default="../shared/data/chest_xray")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    configure_logging()
    path = args.model_path or str(default_model_path())
    cfg = load_checkpoint(path)["config"]
    splits = split_from_config(cfg, args.data_dir, 32)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "validation"
        for cls in CLASS_NAMES:
            (root / cls).mkdir(parents=True)
        for f, label in zip(splits.val.paths, splits.val.labels.tolist()):
            (root / CLASS_NAMES[label] / Path(f).name).symlink_to(Path(f).resolve())
        html = Path(tmp) / "report.html"
        rc = evaluate_main(["--model_path", path, "--data_dir", str(root), "--report", str(html),
                            "--output_path", str(out / "validation_metrics.json")])
        if rc != 0:
            raise SystemExit(f"evaluate failed with exit code {rc}")
        screenshot(html, out / "report.png", height=2700)
    print(f"wrote {out / 'report.png'} and {out / 'validation_metrics.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
