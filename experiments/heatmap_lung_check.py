#!/usr/bin/env python
"""Does the model's Grad-CAM evidence for pneumonia lie on the central lung region?

For every film in ``fullres_sample/PNEUMONIA`` (full-size originals, decoded and stretched to the
model's input exactly as ``MedicalImageInference`` does), computes the PNEUMONIA Grad-CAM, the share
of its mass inside the central box (``heatmap.CENTRAL_LUNG_BOX``) and whether its peak lies inside.
A uniform map is the baseline for both: its share, and the chance that a random peak falls in the
box, are the box's area. Means come with a 95% patient-bootstrap interval.

    python experiments/heatmap_lung_check.py --json docs/heatmap_lung_check.json
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch

from pneumoscan.checkpoint import default_model_path, load_checkpoint
from pneumoscan.cli import configure_logging
from pneumoscan.data import patient_id
from pneumoscan.heatmap import CENTRAL_LUNG_BOX, box_pixels, central_lung_fraction
from pneumoscan.inference import list_inputs
from pneumoscan.predict import Predictor
from pneumoscan.preprocess import decode_image
from pneumoscan.results import write_json

log = logging.getLogger("pneumoscan.experiments.heatmap_lung_check")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def patient_bootstrap_ci(values: np.ndarray, patients: list[str], n_boot: int = 2000,
                         seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of ``values``, resampling patients (films of one child move together)."""
    ids = sorted(set(patients))
    rows = {p: np.flatnonzero(np.array(patients) == p) for p in ids}
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(n_boot):
        idx = np.concatenate([rows[ids[i]] for i in rng.integers(0, len(ids), len(ids))])
        means.append(values[idx].mean())
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def measure(predictor: Predictor, threshold: float, path: Path, box: tuple[float, ...]) -> dict:
    """CAM statistics of one film, through the same forward path as prediction."""
    pixels = predictor.spec.pixels(decode_image(path, predictor.spec.image_size).gray)
    p_pneumonia = float(predictor.probabilities(predictor.logits(torch.from_numpy(pixels)[None]))[0, 1])
    cam = predictor.gradcam(pixels, target_class=1)
    r0, c0, r1, c1 = box_pixels(cam.shape, box)
    row, col = np.unravel_index(int(cam.argmax()), cam.shape)
    return {"file": path.name, "patient": patient_id(path.name), "p_pneumonia": p_pneumonia,
            "predicted_pneumonia": p_pneumonia >= threshold,
            "zero_cam": not cam.any(), "fraction": central_lung_fraction(cam, box),
            "peak_inside": bool(cam.any() and r0 <= row < r1 and c0 <= col < c1),
            "peak_rel": [float((col + 0.5) / cam.shape[1]), float((row + 0.5) / cam.shape[0])]}


def summarise(rows: list[dict], uniform: float) -> dict:
    valid = [r for r in rows if not r["zero_cam"]]
    frac = np.array([r["fraction"] for r in valid])
    peak = np.array([r["peak_inside"] for r in valid], dtype=float)
    patients = [r["patient"] for r in valid]
    return {
        "images": len(rows), "patients": len(set(r["patient"] for r in rows)),
        "zero_cams": len(rows) - len(valid),
        "predicted_pneumonia": sum(r["predicted_pneumonia"] for r in rows),
        "mean_fraction": float(frac.mean()), "mean_fraction_ci95": patient_bootstrap_ci(frac, patients),
        "median_fraction": float(np.median(frac)),
        "fraction_quartiles": [float(q) for q in np.percentile(frac, [25, 75])],
        "images_above_uniform": float((frac > uniform).mean()),
        "peak_inside": float(peak.mean()), "peak_inside_ci95": patient_bootstrap_ci(peak, patients),
        "uniform_fraction": uniform, "uniform_peak_inside": uniform,
    }


def format_table(s: dict) -> str:
    ci = "{:.3f} [{:.3f}, {:.3f}]"
    lines = [
        f"{'':38s}{'Grad-CAM (PNEUMONIA)':>26s}{'uniform map':>14s}",
        f"{'mean share of CAM mass in box':38s}{ci.format(s['mean_fraction'], *s['mean_fraction_ci95']):>26s}"
        f"{s['uniform_fraction']:>14.3f}",
        f"{'median share (IQR)':38s}"
        f"{'{:.3f} ({:.3f}-{:.3f})'.format(s['median_fraction'], *s['fraction_quartiles']):>26s}"
        f"{s['uniform_fraction']:>14.3f}",
        f"{'images with share above uniform':38s}{s['images_above_uniform']:>26.3f}{'-':>14s}",
        f"{'images whose CAM peak is in the box':38s}{ci.format(s['peak_inside'], *s['peak_inside_ci95']):>26s}"
        f"{s['uniform_peak_inside']:>14.3f}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=None, help="checkpoint (default: the shipped model)")
    p.add_argument("--image_dir", default=str(SHARED / "fullres_sample" / "PNEUMONIA"))
    p.add_argument("--box", type=float, nargs=4, default=CENTRAL_LUNG_BOX, metavar=("X0", "Y0", "X1", "Y1"),
                   help="relative central box (default %(default)s)")
    p.add_argument("--json", required=True, help="where to write the per-image results and the summary")
    args = p.parse_args(argv)
    configure_logging()
    model_path = args.model_path or str(default_model_path())
    ckpt = load_checkpoint(model_path)
    predictor = Predictor.from_checkpoint(ckpt, "cpu")
    box = tuple(args.box)
    files = list_inputs(args.image_dir)
    t0 = time.perf_counter()
    rows = []
    for i, path in enumerate(files, 1):
        rows.append(measure(predictor, float(ckpt.get("threshold", 0.5)), path, box))
        if i % 20 == 0:
            log.info("%d/%d films, %.1f s", i, len(files), time.perf_counter() - t0)
    size = predictor.spec.image_size
    summary = summarise(rows, central_lung_fraction(np.ones((size, size)), box))
    print(format_table(summary))
    write_json({"model_path": model_path, "model_version": ckpt.get("model_version"), "image_dir": args.image_dir,
                "box": box, "target_class": 1, "layer": "features[-1] before MaxPool",
                "seconds": time.perf_counter() - t0, "summary": summary, "images": rows}, args.json)
    log.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
