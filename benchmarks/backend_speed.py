#!/usr/bin/env python
"""Model-only throughput of the shipped model per backend, and whether the fast backends predict the same.

    python benchmarks/backend_speed.py

Speed: batches of 16 uint8 224 px images through ``outputs()`` (logits and gate features, as
``pneumoscan predict`` runs them); the backends take turns for ``--rounds`` rounds so that load
from other processes falls on all of them alike; the median round is reported (and the best).
Equality, against torch float32 on the shipped model's validation split (rebuilt from its config):
labels at the stored threshold on calibrated P(PNEUMONIA), AUROC, max |dP|, and the out-of-scope
gate's feature-stage verdicts on those images and on ``dev_shift`` (other sources, where the gate
refuses images). The int8 model is calibrated on training images, never the validation split.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch
from _common import SHARED_DATA, emit

from pneumoscan.backends import make_predictor
from pneumoscan.checkpoint import default_model_path, load_checkpoint
from pneumoscan.data import split_from_config
from pneumoscan.gate import OutOfScopeGate
from pneumoscan.inference import list_inputs
from pneumoscan.metrics import auroc
from pneumoscan.preprocess import decode_image


def images_per_s(predictor, batches: list[torch.Tensor]) -> float:
    t0 = time.perf_counter()
    for b in batches:
        predictor.outputs(b, batch_size=len(b))
    return sum(len(b) for b in batches) / (time.perf_counter() - t0)


def shift_pixels(folder, spec) -> torch.Tensor:
    """uint8 model inputs of every image under ``folder``, preprocessed as ``pneumoscan predict`` does."""
    files = list_inputs(folder)
    return torch.from_numpy(np.stack([spec.pixels(decode_image(f, spec.image_size).gray) for f in files]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=str(SHARED_DATA / "chest_xray"))
    p.add_argument("--shift_dir", default=str(SHARED_DATA / "dev_shift"))
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--batches", type=int, default=6, help="batches timed per backend per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    ckpt = load_checkpoint(default_model_path())
    split = split_from_config(ckpt["config"], args.data_dir, 224)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        int8 = make_predictor(ckpt, "cpu", "onnx-int8", calibration_dir=args.data_dir, cache_dir=cache)
        int8_build_s = time.perf_counter() - t0
        backends = {
            f"torch fp32 ({threads} threads)": make_predictor(ckpt, "cpu", "torch"),
            f"onnx fp32 ({threads} threads)": make_predictor(ckpt, "cpu", "onnx"),
            f"onnx int8 ({threads} threads)": int8,
            "onnx int8 (1 thread)": make_predictor(ckpt, "cpu", "onnx-int8", cache_dir=cache, num_threads=1),
        }
    reference = next(iter(backends))
    same_outputs = {"onnx int8 (1 thread)"}  # the int8 model again: its outputs are the row above's

    bs = args.batch_size
    timed = split.train.images[: bs * args.batches]
    batches = [timed[i:i + bs] for i in range(0, len(timed), bs)]
    speeds: dict[str, list[float]] = {name: [] for name in backends}
    for predictor in backends.values():
        predictor.outputs(batches[0], batch_size=bs)  # warm-up
    for _ in range(args.rounds):
        for name, predictor in backends.items():
            speeds[name].append(images_per_s(predictor, batches))

    gate = OutOfScopeGate.from_dict(ckpt["ood_gate"])
    threshold, labels = float(ckpt["threshold"]), split.val.labels.numpy()
    shift = shift_pixels(args.shift_dir, backends[reference].spec)
    per_backend = {}
    for name, predictor in backends.items():
        if name in same_outputs:
            continue
        out = predictor.outputs(split.val.images, batch_size=bs)
        prob = predictor.probabilities(out.logits)[:, 1].numpy()
        in_scope = np.array([v.in_scope for v in gate.check_features(out.features)])
        shift_scope = np.array([v.in_scope for v in gate.check_features(predictor.outputs(shift, batch_size=bs)
                                                                        .features)])
        row = {"prob": prob, "label": prob >= threshold, "auroc": auroc(labels, prob), "in_scope": in_scope,
               "shift_in_scope": shift_scope}
        per_backend[name] = row
    ref = per_backend[reference]

    result = {"batch_size": bs, "image_size": 224, "timed_images_per_round": len(timed), "rounds": args.rounds,
              "validation_images": len(split.val), "shift_images": len(shift), "threshold": threshold,
              "int8_quantisation_s": int8_build_s, "backends": {}}
    for name in backends:
        row = per_backend.get(name)
        entry = {"img_per_s_median": statistics.median(speeds[name]), "img_per_s_best": max(speeds[name]),
                 "speedup_vs_torch_fp32": statistics.median(speeds[name]) / statistics.median(speeds[reference])}
        if row is not None:
            entry |= {
                "label_agreement": float((row["label"] == ref["label"]).mean()),
                "labels_differing": int((row["label"] != ref["label"]).sum()),
                "auroc": row["auroc"], "auroc_minus_torch_fp32": row["auroc"] - ref["auroc"],
                "max_abs_dprob": float(np.abs(row["prob"] - ref["prob"]).max()),
                "gate_agreement_val": float((row["in_scope"] == ref["in_scope"]).mean()),
                "gate_refused_val": int((~row["in_scope"]).sum()),
                "gate_agreement_shift": float((row["shift_in_scope"] == ref["shift_in_scope"]).mean()),
                "gate_refused_shift": int((~row["shift_in_scope"]).sum()),
            }
        result["backends"][name] = entry
    lines = [f"{name}: {e['img_per_s_median']:.1f} img/s ({e['speedup_vs_torch_fp32']:.2f}x)"
             + (f", labels {e['label_agreement']:.2%} agree, dAUROC {e['auroc_minus_torch_fp32']:+.4f}, "
                f"gate {e['gate_agreement_val']:.2%} / {e['gate_agreement_shift']:.2%} agree"
                if "label_agreement" in e else "")
             for name, e in result["backends"].items()]
    emit(result, "\n".join(lines), args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
