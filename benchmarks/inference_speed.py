#!/usr/bin/env python
"""Prediction throughput of the shipped model on real full-size originals (decode + gate + model).

    python benchmarks/inference_speed.py --n 60
"""

from __future__ import annotations

import argparse
import time

from _common import SHARED_DATA, emit

from pneumoscan.inference import MedicalImageInference, list_inputs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image_dir", default=str(SHARED_DATA / "fullres_sample"))
    p.add_argument("--n", type=int, default=60)
    p.add_argument("--batch_size", type=int, default=16)
    args = p.parse_args()
    files = list_inputs(args.image_dir)[: args.n]
    engine = MedicalImageInference(batch_size=args.batch_size)
    engine.predict_batch(files[:4])  # warm-up
    t0 = time.perf_counter()
    engine.predict_batch(files)
    batch_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for f in files[:20]:
        engine.predict_image(f)
    single_s = (time.perf_counter() - t0) / min(20, len(files))
    result = {"images": len(files), "batch_size": args.batch_size, "batch_img_per_s": len(files) / batch_s,
              "single_image_latency_s": single_s}
    emit(result, f"{result['batch_img_per_s']:.1f} images/s in batches of {args.batch_size}, "
                 f"{1000 * single_s:.0f} ms for one image", None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
