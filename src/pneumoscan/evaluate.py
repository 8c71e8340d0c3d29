"""Running a model over decoded images and measuring it."""

from __future__ import annotations

import logging

import numpy as np
import torch

from .calibration import calibrated_probs
from .data import ImageSet
from .metrics import expected_calibration_error, metrics_with_ci
from .preprocess import to_model_input

log = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(name)


@torch.no_grad()
def predict_outputs(model: torch.nn.Module, images: torch.Tensor, normalization: dict, in_channels: int,
                    device: torch.device, batch_size: int = 64, features: bool = True
                    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits (N, 2) and each block's spatially pooled features (list of (N, C_i)), on the CPU, in eval mode.

    With ``features=False`` only the logits are computed (the feature list is empty).
    """
    model.eval()
    logits, feats = [], []
    for start in range(0, len(images), batch_size):
        x = to_model_input(images[start:start + batch_size].to(device), normalization["mean"],
                           normalization["std"], in_channels)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if features:
                lg, pooled = model.forward_with_features(x)
                feats.append([f.float().cpu() for f in pooled])
            else:
                lg = model(x)
        logits.append(lg.float().cpu())
    if not logits:
        return torch.zeros((0, 2)), []
    return torch.cat(logits), [torch.cat(per_block) for per_block in zip(*feats)]


def predict_logits(model: torch.nn.Module, images: torch.Tensor, normalization: dict, in_channels: int,
                   device: torch.device, batch_size: int = 64) -> torch.Tensor:
    """Logits (N, 2) on the CPU for uint8 images (N, S, S), in eval mode, in batches."""
    return predict_outputs(model, images, normalization, in_channels, device, batch_size, features=False)[0]


def evaluate_imageset(model: torch.nn.Module, data: ImageSet, ckpt: dict, device: torch.device,
                      threshold: float | None = None, n_boot: int = 1000) -> tuple[dict, np.ndarray]:
    """Metrics with patient-level bootstrap CIs and calibration of ``model`` on ``data``, and P(PNEUMONIA).

    Probabilities are calibrated with the checkpoint's temperature when it has one; the
    threshold is the checkpoint's unless one is given.
    """
    logits = predict_logits(model, data.images, ckpt["normalization"], ckpt["in_channels"], device)
    prob = probabilities(logits, ckpt.get("temperature"))
    y = data.labels.numpy()
    thr = ckpt.get("threshold", 0.5) if threshold is None else threshold
    report = metrics_with_ci(y, prob, thr, n_boot=n_boot, groups=data.patients)
    report["temperature"] = ckpt.get("temperature") or 1.0
    report["calibrated"] = ckpt.get("temperature") is not None
    report["ece_15"] = expected_calibration_error(y, prob)
    report["class_counts"] = data.class_counts()
    return report, prob


def probabilities(logits: torch.Tensor, temperature: float | None) -> np.ndarray:
    """P(PNEUMONIA) as numpy, calibrated when a temperature is given."""
    return calibrated_probs(logits, temperature or 1.0)[:, 1].numpy()
