#!/usr/bin/env python
"""Name a finished checkpoint and copy it to where the package ships it.

The last step before a model becomes the default: after training, ``fit_scope.py --write`` and
``int8_calibrate.py``, it gets the version every prediction reports and a note on where it came from.

    python experiments/ship_model.py --model_path /work/runs/v1ft/medical_cnn_model.pth \
        --version pneumoscan-v2.0 --note "..." --out src/pneumoscan/weights/pneumoscan-v2.pth

Refuses a checkpoint that lacks calibration, the scope classifier or the int8 ranges, since the
shipped model must predict right after install with all of them.
"""

from __future__ import annotations

import argparse
import logging

from pneumoscan.calibration import temperature_text
from pneumoscan.checkpoint import load_checkpoint, save_checkpoint
from pneumoscan.cli import configure_logging

log = logging.getLogger("pneumoscan.experiments.ship_model")

REQUIRED = ("temperature", "ood_gate", "scope_classifier", "int8_calibration")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True)
    p.add_argument("--version", required=True, help="the model_version every prediction reports")
    p.add_argument("--note", required=True, help="how it was made (stored as training_note)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    configure_logging()
    ckpt = load_checkpoint(args.model_path)
    missing = [k for k in REQUIRED if not ckpt.get(k)]
    if missing:
        raise SystemExit(f"{args.model_path} lacks {', '.join(missing)}: run fit_scope.py --write and "
                         f"int8_calibrate.py on it first")
    if ckpt.get("calibration_bias"):  # a site's calibration (calibrate --intercept), not a model to ship
        raise SystemExit(f"{args.model_path} has a calibration intercept (a site checkpoint); the shipped model is "
                         f"calibrated by a temperature alone (docs/experiments.md, 'Calibration with an intercept')")
    ckpt["model_version"], ckpt["training_note"] = args.version, args.note
    save_checkpoint(ckpt, args.out)
    log.info("%s written to %s (threshold %.4f, temperature %s)", args.version, args.out, ckpt["threshold"],
             temperature_text(ckpt["temperature"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
