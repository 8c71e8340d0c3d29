#!/usr/bin/env python
"""Folders of a model's own validation films for the in-use measurements (docs/experiments.md).

Writes, under ``--out``, labelled folders (``NORMAL/``, ``PNEUMONIA/``) that ``pneumoscan evaluate``
and ``pneumoscan calibrate`` read:
- ``plain/``: the validation films of the model's stored split as they are (copies of the files);
- ``eq/``: the same films histogram-equalised (PIL ``ImageOps.equalize`` on the grey levels, PNG),
  a processing change no recipe trains on, as another site's might be; ``jpeg_q10/`` and
  ``lowres_25/``: the other two stress changes of ``kfold_eval.py`` (JPEG quality 10; resolution
  loss to 25 % and back), PNG;
- ``siteA/`` and ``siteB/``: the equalised films of two halves of the validation patients (patients
  dealt at random with ``--seed``), for the ``calibrate --refit_gate`` protocol: fit on A, measure on B.

    cd experiments && PYTHONPATH=. python inuse_folders.py --data_dir ../../shared/data/chest_xray --out /tmp/inuse
    pneumoscan evaluate --data_dir /tmp/inuse/eq --output_path eq.json --n_boot 200

These scripts were first run from outside the repository (``/work/runs/s7/inuse_val.py`` and
``gate_site.py``, sixth session); this is their replacement, so its site halves are not those of the
sixth session's run.
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
from pathlib import Path

import numpy as np
from kfold_eval import STRESS
from PIL import Image

from pneumoscan.checkpoint import default_model_path, input_spec, load_checkpoint
from pneumoscan.cli import configure_logging
from pneumoscan.data import CLASS_NAMES, split_from_config

log = logging.getLogger("pneumoscan.inuse_folders")


FOLDERS = {"eq": STRESS["hist_eq"], "jpeg_q10": STRESS["jpeg_q10"], "lowres_25": STRESS["lowres_25"]}




def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data_dir", required=True, help="the data set the model was trained on")
    ap.add_argument("--model_path", default="", help="checkpoint whose stored split to use (default: shipped)")
    ap.add_argument("--out", required=True, help="folder to create (must not exist)")
    ap.add_argument("--seed", type=int, default=7, help="seed for dealing patients to site A and B")
    ap.add_argument("--cache_dir", default="")
    args = ap.parse_args(argv)
    configure_logging(None)

    out = Path(args.out)
    if out.exists():
        ap.error(f"--out {str(out)!r} already exists; give a new folder")
    ckpt = load_checkpoint(args.model_path or default_model_path())
    val = split_from_config(ckpt["config"], args.data_dir, input_spec(ckpt).image_size, args.cache_dir).val

    patients = sorted(set(val.patients))
    random.Random(args.seed).shuffle(patients)
    site_a = set(patients[: len(patients) // 2])
    for path, label, patient in zip(val.paths, val.labels.tolist(), val.patients):
        src = Path(path)
        cls = CLASS_NAMES[label]
        site = "siteA" if patient in site_a else "siteB"
        for sub in ("plain", *FOLDERS, site):
            (out / sub / cls).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out / "plain" / cls / src.name)
        png = Path(src.name).with_suffix(".png")
        with Image.open(src) as im:
            gray = np.asarray(im.convert("L"))
        for sub, fn in FOLDERS.items():  # the grey levels changed by each kfold_eval.STRESS change, as PNG
            Image.fromarray(fn(gray)).save(out / sub / cls / png)
        shutil.copyfile(out / "eq" / cls / png, out / site / cls / png)
    log.info("%d films of %d patients under %s (site A: %d patients, site B: %d)", len(val), len(patients),
             out, len(site_a), len(patients) - len(site_a))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
