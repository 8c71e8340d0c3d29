#!/usr/bin/env python
"""Test-time augmentation (TTA) on one trained model: the numbers of ``kfold_eval.py --single`` for
the plain model and for sets of views whose logits are averaged (docs/experiments.md, "Test-time
augmentation on the shipped model").

Each view is computed once per film (on the validation films, their stressed copies and the adult
dev_shift films) and the sets are means of those logits, so the plain model and every set are scored
on the same films in one run. Each set gets its own temperature and threshold, cross-fitted over 5
patient groups of the validation films as ``kfold_eval.py --single`` does for one model.

    python experiments/tta_eval.py --data_dir ../shared/data/chest_xray --json docs/cv/tta_v2.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kfold_eval import SHARED, STRESS, adult_films, adult_pixels, stressed  # noqa: E402

from pneumoscan.calibration import positive_probability  # noqa: E402
from pneumoscan.checkpoint import default_model_path, input_spec, load_checkpoint, model_from_checkpoint  # noqa: E402
from pneumoscan.cli import configure_logging  # noqa: E402
from pneumoscan.cv import OutOfFold, deal_patients, oof_report  # noqa: E402
from pneumoscan.data import split_from_config  # noqa: E402
from pneumoscan.metrics import auroc  # noqa: E402
from pneumoscan.predict import Predictor  # noqa: E402

log = logging.getLogger("pneumoscan.tta_eval")


def zoom(x: torch.Tensor, keep: float = 0.9) -> torch.Tensor:
    """The central ``keep`` fraction of each image, resized back to the input size."""
    s = x.shape[-1]
    c = round(s * keep)
    a = (s - c) // 2
    return F.interpolate(x[..., a:a + c, a:a + c], size=(s, s), mode="bilinear", align_corners=False)


VIEWS = {
    "identity": lambda x: x,
    "hflip": lambda x: x.flip(-1),
    "zoom": zoom,
    "hflip_zoom": lambda x: zoom(x).flip(-1),
}
SETS = {"plain": ["identity"], "A": ["identity", "hflip"], "B": ["identity", "zoom"],
        "C": ["identity", "hflip", "zoom", "hflip_zoom"]}


class View(nn.Module):
    """A model that sees its (normalised) input through one view."""

    def __init__(self, base: nn.Module, view) -> None:
        super().__init__()
        self.base, self.view = base, view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(self.view(x))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--model_path", default="", help="a checkpoint (default: the shipped model)")
    p.add_argument("--json", required=True)
    p.add_argument("--cache_dir", default="")
    p.add_argument("--adult_dir", default=str(SHARED / "dev_shift"))
    args = p.parse_args(argv)
    configure_logging(None)
    torch.manual_seed(0)
    path = Path(args.model_path) if args.model_path else default_model_path()
    ckpt = load_checkpoint(path)
    spec = input_spec(ckpt)
    val = split_from_config(ckpt["config"], args.data_dir, spec.image_size, args.cache_dir).val
    adult_paths, adult_y = adult_films(Path(args.adult_dir))
    inputs = {"clean": val.images, **{k: stressed(val.images, fn) for k, fn in STRESS.items()},
              "adult": adult_pixels(spec, adult_paths)}
    base = model_from_checkpoint(ckpt)
    logits: dict[str, dict[str, torch.Tensor]] = {}
    for name, fn in VIEWS.items():
        pred = Predictor(View(base, fn), spec)
        logits[name] = {k: pred.logits(v) for k, v in inputs.items()}
        log.info("view %s done", name)
    y = val.labels.numpy()
    groups = deal_patients(list(val.patients))  # the groups kfold_eval.py --single cross-validates over
    report = {"source": str(path), "model_version": ckpt.get("model_version", ""), "views": list(VIEWS),
              "sets": SETS, "results": {}}
    for set_name, views in SETS.items():
        lg = {k: torch.stack([logits[v][k] for v in views]).mean(0) for k in inputs}
        oof = oof_report(OutOfFold(lg["clean"], val.labels, list(val.patients), groups))
        stress = {k: auroc(y, positive_probability(lg[k])) for k in STRESS}
        r = {"forward_passes": len(views), "oof": oof, "stress_auroc": stress,
             "stress_auroc_mean": float(np.mean(list(stress.values()))),
             "adult_auroc": auroc(adult_y, positive_probability(lg["adult"])),
             "adult_n": len(adult_y), "adult_no_finding": int((adult_y == 0).sum())}
        report["results"][set_name] = r
        cv = oof["cross_validated"]
        log.info("%-5s AUROC %.4f [%.4f, %.4f]; cross-validated sens %.3f spec %.3f ECE %.4f; stress %s (mean %.5f); "
                 "adult AUROC %.3f", set_name, oof["auroc"]["value"], oof["auroc"]["ci_low"], oof["auroc"]["ci_high"],
                 cv["sensitivity"], cv["specificity"], cv["ece"], {k: round(v, 4) for k, v in stress.items()},
                 r["stress_auroc_mean"], r["adult_auroc"])
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
