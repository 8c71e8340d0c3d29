#!/usr/bin/env python
"""Is the films' original aspect ratio a class shortcut, and does the model use it? (docs/experiments.md)

The training films were stretched to a square from originals whose shape differs by class (in
``fullres_sample/``, normals are larger and nearer square than pneumonias), so a stretched pneumonia
film shows its chest squeezed sideways more than a normal film does: a model can learn the squeeze
instead of the lungs. This reports
- on the 240 originals: the AUROC of the aspect ratio (width / height) and of the pixel count alone;
- on the model's validation films: the model's outputs when the content is rescaled sideways by a
  factor ``f`` (``f`` < 1: as if the original had been wider, e.g. an aspect of 1.2 taken as 1.5 is
  f = 0.8; the uncovered sides repeat the border), and the same vertically as a control; and with
  ``--compare`` another checkpoint side by side.

    python experiments/aspect_shortcut.py --data_dir ../shared/data/chest_xray --data_root ../shared/data
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pneumoscan.calibration import positive_probability
from pneumoscan.checkpoint import default_model_path, input_spec, load_checkpoint
from pneumoscan.cli import configure_logging
from pneumoscan.data import split_from_config
from pneumoscan.metrics import auroc
from pneumoscan.predict import Predictor

log = logging.getLogger("pneumoscan.aspect_shortcut")
FACTORS = (0.7, 0.8, 0.9, 1.0, 1.1, 1.25)
RESOLUTIONS = (0.5, 0.25)
MIXED_RANGE = 0.75  # per-film sideways factor log-uniform in [0.75, 1 / 0.75]


# every probed condition, in report order: sideways (x) and vertical (y) rescalings, resolution loss (r)
# and mixed shapes
CONDITIONS = (*(("plain" if f == 1.0 else f"x{f}") for f in FACTORS), *(f"y{f}" for f in FACTORS if f != 1.0),
              *(f"r{r}" for r in RESOLUTIONS), "mixed")


def rescale(images: torch.Tensor, f: float | np.ndarray, axis: str = "x") -> torch.Tensor:
    """uint8 (N, S, S) films with their content scaled by ``f`` (one factor, or one per film) along
    ``axis`` about the centre."""
    x = images.float().unsqueeze(1)
    inv = torch.as_tensor(1.0 / np.asarray(f, dtype=np.float64), dtype=torch.float32).expand(len(x))
    theta = torch.zeros(len(x), 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = (inv, 1.0) if axis == "x" else (1.0, inv)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.squeeze(1).round().clamp(0, 255).to(torch.uint8)


def lowres(images: torch.Tensor, r: float) -> torch.Tensor:
    """uint8 (N, S, S) films taken down to ``r`` of their side (area) and back up (bilinear), as the
    acquisition augmentation does."""
    x = images.float().unsqueeze(1)
    small = F.interpolate(x, scale_factor=r, mode="area")
    out = F.interpolate(small, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return out.squeeze(1).round().clamp(0, 255).to(torch.uint8)


def condition(images: torch.Tensor, name: str) -> torch.Tensor:
    """The films under one of ``CONDITIONS``."""
    if name == "plain":
        return images
    if name == "mixed":
        rng = np.random.default_rng(0)
        return rescale(images, np.exp(rng.uniform(np.log(MIXED_RANGE), -np.log(MIXED_RANGE), len(images))))
    if name[0] == "r":
        return lowres(images, float(name[1:]))
    return rescale(images, float(name[1:]), name[0])


def original_shapes(root: Path) -> dict:
    sizes, labels = [], []
    for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
        for f in sorted((root / "fullres_sample" / cls).iterdir()):
            with Image.open(f) as img:
                sizes.append(img.size)
            labels.append(label)
    y, wh = np.array(labels), np.array(sizes, dtype=float)
    aspect, pixels = wh[:, 0] / wh[:, 1], wh[:, 0] * wh[:, 1]
    out = {"n": len(y), "auroc_aspect": auroc(y, aspect), "auroc_smaller": auroc(y, -pixels)}
    for label, cls in enumerate(("normal", "pneumonia")):
        out[f"aspect_quartiles_{cls}"] = np.percentile(aspect[y == label], [25, 50, 75]).round(3).tolist()
    return out


def probe(ckpt: dict, images: torch.Tensor, y: np.ndarray, only: tuple[str, ...] = CONDITIONS) -> dict:
    pred, thr = Predictor.from_checkpoint(ckpt), ckpt["threshold"]
    rows = {}
    for key in only:
        p = positive_probability(pred.logits(condition(images, key)), pred.temperature, pred.bias)
        rows[key] = {"auroc": auroc(y, p), "normal_mean_p": float(p[y == 0].mean()),
                     "normals_called_pneumonia": int((p[y == 0] >= thr).sum()),
                     "pneumonias_called_normal": int((p[y == 1] < thr).sum())}
        r = rows[key]
        log.info("%-8s %-6s AUROC %.4f  normals: mean P %.3f, called PNEUMONIA %3d/%d  pneumonias called NORMAL "
                 "%3d/%d", ckpt.get("model_version", "?"), key, r["auroc"], r["normal_mean_p"],
                 r["normals_called_pneumonia"], (y == 0).sum(), r["pneumonias_called_normal"], (y == 1).sum())
    if only != CONDITIONS:
        return rows
    rescaled = [r for k, r in rows.items() if k[0] in "xy"]
    rows["aspect_errors"] = sum(r["normals_called_pneumonia"] + r["pneumonias_called_normal"] for r in rescaled)
    log.info("wrong labels summed over the %d rescaled conditions: %d", len(rescaled), rows["aspect_errors"])
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--data_root", required=True, help="folder holding fullres_sample/")
    p.add_argument("--model_path", default="", help="a checkpoint (default: the shipped model)")
    p.add_argument("--compare", default="", help="another checkpoint, scored on the same films")
    p.add_argument("--compare_only", nargs="+", choices=CONDITIONS, metavar="CONDITION",
                   help=f"score --compare only under these conditions, of {' '.join(CONDITIONS)}")
    p.add_argument("--json", default="")
    p.add_argument("--cache_dir", default="")
    p.add_argument("--num_threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    configure_logging(None)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    report = {"originals": original_shapes(Path(args.data_root))}
    log.info("originals: %s", report["originals"])
    ckpt = load_checkpoint(args.model_path or default_model_path())
    val = split_from_config(ckpt["config"], args.data_dir, input_spec(ckpt).image_size, args.cache_dir).val
    y = val.labels.numpy()
    report["model"] = probe(ckpt, val.images, y)
    if args.compare:
        only = tuple(c for c in CONDITIONS if c in args.compare_only) if args.compare_only else CONDITIONS
        report["compare"] = probe(load_checkpoint(args.compare), val.images, y, only)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
