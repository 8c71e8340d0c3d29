#!/usr/bin/env python
"""Time the scope classifier's share of inference: ``ScopeClassifier.check`` on one batch of features and pixels.

The features come from the forward pass every input already makes, so this is the whole extra cost.

    python experiments/scope_speed.py --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch

from pneumoscan.checkpoint import default_model_path, load_checkpoint
from pneumoscan.scope import ScopeClassifier


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.model_path or default_model_path())
    clf = ScopeClassifier.from_dict(ckpt["scope_classifier"])
    size = ckpt["input_spec"]["image_size"]
    for batch in (1, 16):
        feats = [torch.rand(batch, w) for w in ckpt["model_kwargs"]["widths"]]
        pixels = torch.randint(0, 256, (batch, size, size), dtype=torch.uint8)
        clf.check(feats, pixels)  # warm-up
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            clf.check(feats, pixels)
        per_image = (time.perf_counter() - t0) / args.repeats / batch
        print(f"batch {batch:2d}: {per_image * 1000:.2f} ms per image ({args.threads} threads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
