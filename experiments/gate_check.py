#!/usr/bin/env python
"""Measure the out-of-scope gate: false rejections on real radiographs, catch rate on non-radiographs.

    python experiments/ood_corpus.py --out /tmp/ood
    python experiments/gate_check.py --xray_dir ../shared/data --ood_dir /tmp/ood --json docs/gate/gate_check.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from pneumoscan.cli import configure_logging
from pneumoscan.inference import InferenceFailure, MedicalImageInference, list_inputs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=None)
    p.add_argument("--xray_dir", default="../shared/data")
    p.add_argument("--ood_dir", required=True)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    configure_logging()
    import logging

    logging.getLogger("pneumoscan.inference").setLevel(logging.ERROR)
    engine = MedicalImageInference(args.model_path, batch_size=32)
    t0 = time.time()
    xrays = list_inputs(args.xray_dir)
    outcomes = engine.predict_batch(xrays)
    refused = [(str(f), o.error) for f, o in zip(xrays, outcomes)
               if isinstance(o, InferenceFailure) and o.error_type == "OutOfScopeError"]
    other_errors = [(str(f), o.error) for f, o in zip(xrays, outcomes)
                    if isinstance(o, InferenceFailure) and o.error_type != "OutOfScopeError"]
    ood = list_inputs(args.ood_dir)
    ood_out = engine.predict_batch(ood)
    per_cat: dict[str, Counter] = {}
    missed = []
    for f, o in zip(ood, ood_out):
        cat = f.relative_to(args.ood_dir).parts[0]
        caught = isinstance(o, InferenceFailure)
        per_cat.setdefault(cat, Counter())["caught" if caught else "missed"] += 1
        if not caught:
            missed.append(str(f))
    result = {
        "model_version": engine.model_version,
        "xray_images": len(xrays), "false_rejections": len(refused),
        "false_rejection_rate": len(refused) / len(xrays), "rejected_xrays": refused,
        "xray_decode_errors": other_errors,
        "ood_images": len(ood), "caught": len(ood) - len(missed), "catch_rate": (len(ood) - len(missed)) / len(ood),
        "per_category": {k: dict(v) for k, v in sorted(per_cat.items())}, "missed": missed,
        "seconds": time.time() - t0,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"false rejections: {len(refused)}/{len(xrays)} = {result['false_rejection_rate']:.2%}")
    print(f"caught: {result['caught']}/{len(ood)} = {result['catch_rate']:.1%}")
    for k, v in result["per_category"].items():
        print(f"  {k:<14} caught {v.get('caught', 0):3d}  missed {v.get('missed', 0):3d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
