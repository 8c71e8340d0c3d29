#!/usr/bin/env python
"""Patient-level k-fold cross-validation of a training recipe (issue 7).

Named recipes (preset + overrides) for ``cv.train_folds``: K ordinary training runs in
OUT/RECIPE/foldI, fold I validating; a run that was interrupted continues with --resume, a
finished one is skipped, so the command can simply be started again after a kill.
``experiments/kfold_eval.py`` turns the K runs into out-of-fold numbers, shift proxies and an
ensemble checkpoint. (``pneumoscan train --cv_folds K`` does the same for one set of flags.)

    python experiments/kfold.py --data_dir ../shared/data/chest_xray --out runs/cv --recipe fast_acq
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pneumoscan.cli import configure_logging
from pneumoscan.config import LR_SCHEDULES, TrainConfig
from pneumoscan.cv import train_folds

log = logging.getLogger("pneumoscan.kfold")

# preset plus overrides, every value that differs between recipes named (the presets may change);
# "fast_light" is the fast preset as it was before issue 7, "fast_acq_cosine" the fast preset from issue 7
# to 2026-12-02, "fast_mix_cosine" the fast preset since (mixup added, docs/experiments.md)
RECIPES: dict[str, dict] = {
    "fast_light": {"preset": "fast", "augment": "light", "lr_schedule": "plateau", "mixup": 0.0},
    "fast_acq": {"preset": "fast", "augment": "acquisition", "lr_schedule": "plateau", "mixup": 0.0},
    "fast_acq_cosine": {"preset": "fast", "augment": "acquisition", "lr_schedule": "cosine", "mixup": 0.0},
    # the same with random aspect changes, against the film-shape shortcut (docs/experiments.md)
    "fast_asp_cosine": {"preset": "fast", "augment": "acquisition_aspect", "lr_schedule": "cosine", "mixup": 0.0},
    # with per-film histogram equalisation of the input (--intensity equalize)
    "fast_eq_cosine": {"preset": "fast", "augment": "acquisition", "lr_schedule": "cosine",
                       "intensity": "equalize", "mixup": 0.0},
    # with mixup (alpha 0.2): the fast preset since 2026-12-02
    "fast_mix_cosine": {"preset": "fast", "augment": "acquisition", "lr_schedule": "cosine", "mixup": 0.2},
    # the same at quarter width (channels 8-128; about 2.8x faster to train on a 2-core CPU), for slow machines
    "fast_w25_cosine": {"preset": "fast", "augment": "acquisition", "lr_schedule": "cosine", "mixup": 0.2,
                        "width": 0.25},
    "full_acq": {"preset": "full", "augment": "acquisition"},
    "full_asp": {"preset": "full", "augment": "acquisition_aspect"},
    "full_eq": {"preset": "full", "augment": "acquisition", "intensity": "equalize"},
    "full_strong": {"preset": "full", "augment": "strong"},
    # half width at 224 px: five of them cost 1.25x one full-width model (the ensemble to ship, issue 7)
    "half_acq": {"preset": "full", "augment": "acquisition", "width": 0.5},
}


def recipe_config(recipe: str, folds: int, data_dir: str, out: Path, **overrides) -> TrainConfig:
    """The recipe's config for ``folds``-fold cross-validation in OUT/RECIPE; flags that are not None win."""
    spec = dict(RECIPES[recipe])
    preset = spec.pop("preset")
    spec.setdefault("fallback_width", 0.0)  # a recipe's model must not depend on the machine's speed
    spec.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_overrides(preset, data_dir=data_dir, output_dir=str(out / recipe), cv_folds=folds, **spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--recipe", choices=list(RECIPES), required=True)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--only_folds", type=int, nargs="*", help="train only these folds")
    p.add_argument("--minutes", type=float, help="training budget per fold (default: the preset's)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--patience", type=int)
    p.add_argument("--image_size", type=int)
    p.add_argument("--width", type=float)
    p.add_argument("--batch_size", type=int)
    p.add_argument("--lr_schedule", choices=LR_SCHEDULES)
    p.add_argument("--cache_dir", default="")
    p.add_argument("--holdout", action="store_true",
                   help="keep the usual validation patients out of every fold (needed to write an ensemble)")
    args = p.parse_args(argv)
    out = Path(args.out)
    configure_logging(out / args.recipe / "kfold.log")
    cfg = recipe_config(args.recipe, args.folds, args.data_dir, out, max_train_minutes=args.minutes,
                        epochs=args.epochs, patience=args.patience, cache_dir=args.cache_dir,
                        image_size=args.image_size, width=args.width, batch_size=args.batch_size,
                        lr_schedule=args.lr_schedule,
                        cv_holdout=args.holdout)
    log.info("recipe %s, %d folds", args.recipe, args.folds)
    train_folds(cfg, only=args.only_folds or None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
