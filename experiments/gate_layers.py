#!/usr/bin/env python
"""Which blocks' features should the out-of-scope gate use? (the experiment behind gate.DEFAULT_LAYERS)

For each combination of MedicalCNN blocks, fits the multi-layer Mahalanobis gate on 2,000
training images of the shipped model's own split, sets its threshold at the 99.5 % quantile
of validation, and reports false rejections on the other 2,410 training images and the 240
full-size originals, and the catch rate on a generated corpus (experiments/ood_corpus.py).

    python experiments/ood_corpus.py --out /tmp/ood
    python experiments/gate_layers.py --ood_dir /tmp/ood
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from pneumoscan.checkpoint import default_model_path, load_checkpoint
from pneumoscan.data import split_from_config
from pneumoscan.gate import OutOfScopeGate
from pneumoscan.inference import list_inputs
from pneumoscan.predict import Predictor
from pneumoscan.preprocess import decode_image

COMBOS = ((4,), (3,), (2,), (3, 4), (2, 3, 4), (1, 2, 3, 4), (0, 1, 2, 3, 4))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="../shared/data/chest_xray")
    p.add_argument("--fullres_dir", default="../shared/data/fullres_sample")
    p.add_argument("--ood_dir", required=True)
    args = p.parse_args()
    ckpt = load_checkpoint(default_model_path())
    predictor = Predictor.from_checkpoint(ckpt, "cpu")
    size = predictor.spec.image_size
    sp = split_from_config(ckpt["config"], args.data_dir, size)

    def feats(images: torch.Tensor) -> list[torch.Tensor]:
        return predictor.outputs(images).features

    def decode(files) -> torch.Tensor:
        return torch.stack([torch.from_numpy(predictor.spec.pixels(decode_image(f, size).gray)) for f in files])

    idx = torch.randperm(len(sp.train), generator=torch.Generator().manual_seed(0))
    fit, held = idx[:2000], idx[2000:]
    f_fit, f_val, f_held = feats(sp.train.images[fit]), feats(sp.val.images), feats(sp.train.images[held])
    f_full = feats(decode(list_inputs(args.fullres_dir)))
    ood_files = list_inputs(args.ood_dir)
    f_ood = feats(decode(ood_files))
    print("| blocks (0-based) | false rejections, held-out train | false rejections, full-size | catch rate | missed |")
    print("|---|---|---|---|---|")
    for combo in COMBOS:
        gate = OutOfScopeGate.fit(f_fit, sp.train.labels[fit], f_val, layers=combo)
        caught = (gate.scores(f_ood) > gate.threshold).numpy()
        missed: dict[str, int] = {}
        for f, c in zip(ood_files, caught):
            if not c:
                missed[f.parent.name] = missed.get(f.parent.name, 0) + 1
        print(f"| {combo} | {float((gate.scores(f_held) > gate.threshold).float().mean()):.2%} | "
              f"{float((gate.scores(f_full) > gate.threshold).float().mean()):.2%} | {np.mean(caught):.1%} | "
              f"{missed or '-'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
