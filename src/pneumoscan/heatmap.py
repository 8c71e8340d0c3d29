"""Grad-CAM heatmaps: where in the radiograph the model's evidence for a class lies.

Grad-CAM (Selvaraju et al., ICCV 2017) weights each channel of a convolutional feature
map by the spatially averaged gradient of a class logit, sums the channels and keeps the
positive part. By default the map is taken from the last ConvBlock's ReLU output just
before its MaxPool (14 x 14 at 224 px), not from the pooled 7 x 7 tensor that feeds the
global average pool: gradients pass a MaxPool only at each window's maximum, so the
channel weights of the two are the same up to a factor of 4, and the pre-pool map
places them on a grid twice as fine.

The score explained is the target class's log-odds, ``logit[c] - logsumexp(other logits)``
(for two classes, the logit difference), rather than the paper's raw logit: a softmax
ignores what the logits share, and on the shipped model that shared part dominates, so the
raw-logit map for NORMAL on a pneumonia film repeated the PNEUMONIA map (correlation 0.98-0.99
on four films) instead of showing evidence against pneumonia. For the predicted class the two
scores give the same map (correlation 1.00 on eight films).

The map lives on the model's square input, a stretch of the original film; ``overlay_png``
stretches it back, so the heat lands where the model looked on the original geometry.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .atomic import atomic_path

# Relative (x0, y0, x1, y1) of the central part of a pediatric AP film: most of both lung fields
# and the mediastinum, leaving out the borders where side markers, text, arms, neck and
# collimation edges lie (chosen by looking at train/ and fullres_sample/; see docs/heatmaps.md).
CENTRAL_LUNG_BOX = (0.15, 0.15, 0.85, 0.90)


def grad_cam(model: nn.Module, x: torch.Tensor, target_class: int = 1,
             layer: nn.Module | None = None) -> np.ndarray:
    """Grad-CAM of one image for one class, at the model input's resolution.

    Args:
        model: a ``MedicalCNN`` (or any network with ``features[-1].pool`` when ``layer`` is None),
            or an ``Ensemble`` of them (the members' maps for the averaged logits are summed), in eval
            mode; it is left as it was: no hooks, gradients or mode changes remain. A caller's no_grad,
            inference_mode or autocast does not change the map (it is computed in float32).
        x: the normalised model input, shape (1, C, H, W), any memory format.
        target_class: the class whose log-odds are explained, 1 = PNEUMONIA (default), 0 = NORMAL.
        layer: take the map from this module's output instead of the default (the last
            block's activation before its MaxPool).

    Returns:
        float32 array (H, W) in [0, 1], bilinearly upsampled, peak scaled to 1; all zeros
        when no location carries positive evidence for the class.

    Raises:
        ValueError: ``x`` is not a single image, ``target_class`` is not a class of the
            model, or the model or any of its modules is in training mode.
    """
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"grad_cam takes one image of shape (1, C, H, W), got {tuple(x.shape)}")
    # Every module, not only the top one: a BatchNorm left in training mode (model.eval() then
    # block.train(), or dropout switched on for MC sampling) would update its running statistics
    # in this forward pass, changing the model for every later prediction, and make the map random.
    training = [name or "the model" for name, module in model.named_modules() if module.training]
    if training:
        raise ValueError(f"grad_cam needs the model in eval mode (dropout and batch statistics would "
                         f"change the map and the model); {', '.join(training[:3])} "
                         f"{'is' if len(training) == 1 else 'are'} in training mode; call model.eval() first")
    activation: list[torch.Tensor] = []

    def as_leaf(t: torch.Tensor) -> torch.Tensor:
        # A fresh leaf: gradients stop here (nothing flows into earlier layers or parameter
        # .grad), and it works whether or not the parameters require grad.
        leaf = t.detach().requires_grad_(True)
        activation.append(leaf)
        return leaf

    if layer is not None:
        handles = [layer.register_forward_hook(lambda _m, _args, out: as_leaf(out))]
    else:  # an ensemble explains its averaged logits through every member's last block
        nets = list(model.members) if hasattr(model, "members") else [model]
        handles = [net.features[-1].pool.register_forward_pre_hook(lambda _m, args: (as_leaf(args[0]),))
                   for net in nets]
    try:
        # inference_mode(False) and clone() let this run inside a caller's no_grad/inference_mode; autocast off:
        # the map of the fp32 model the threshold was fitted with (in a caller's bfloat16 autocast the map came
        # back bfloat16, which numpy cannot take).
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            logits = model(x.detach().clone())
            if not 0 <= target_class < logits.shape[1]:
                raise ValueError(f"target_class must be one of 0..{logits.shape[1] - 1}, got {target_class}")
            if len(activation) != len(handles):
                raise ValueError(f"the hooked layer ran {len(activation)} times in one forward pass; "
                                 f"pass a layer that runs exactly once")
            others = torch.cat([logits[0, :target_class], logits[0, target_class + 1:]])
            score = logits[0, target_class] - (torch.logsumexp(others, 0) if others.numel() else 0.0)
            grads = torch.autograd.grad(score, activation)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        cam = sum((g.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1, keepdim=True)
                  for g, a in zip(grads, activation))
        cam = torch.relu(cam)
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
        peak = cam.max()
        if not torch.isfinite(peak) or peak <= 1e-12:
            return np.zeros(tuple(x.shape[-2:]), dtype=np.float32)
        return (cam / peak).clamp_(0.0, 1.0).cpu().numpy().astype(np.float32)


def overlay_png(gray: Image.Image, cam: np.ndarray, path: str | os.PathLike, alpha: float = 0.45,
                cmap: str = "jet") -> None:
    """Write a heatmap over a radiograph as an RGB PNG the size of ``gray``, atomically.

    The CAM is stretched to the image's size (the inverse of the stretch-resize that made
    the model input), coloured with ``cmap`` and blended uniformly: ``(1 - alpha) * image +
    alpha * colour``.

    Args:
        gray: the radiograph at the geometry the PNG should have (8-bit grayscale, mode 'L').
        cam: a 2-D map in [0, 1] from ``grad_cam``.
        path: the PNG to write; its folder is created if needed.
        alpha: weight of the colour layer, in [0, 1].
        cmap: a matplotlib colormap name, e.g. ``jet`` or ``inferno``.

    Raises:
        ValueError: ``cam`` is not a finite 2-D array, ``alpha`` is outside [0, 1], or
            ``cmap`` is not a matplotlib colormap.
    """
    from matplotlib import colormaps  # here, not at the top: only overlays need matplotlib's import time

    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim != 2 or not np.isfinite(cam).all():
        raise ValueError(f"cam must be a finite 2-D array, got shape {cam.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    if cmap not in colormaps:
        raise ValueError(f"unknown colormap {cmap!r}; use a matplotlib name such as jet or inferno")
    gray = gray.convert("L")
    heat = Image.fromarray(np.clip(cam, 0.0, 1.0)).resize(gray.size, Image.BILINEAR)
    levels = np.clip(np.asarray(heat) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    # A 256-entry lookup table keeps memory at 3 bytes a pixel on multi-megapixel films.
    lut = (colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0 + 0.5).astype(np.uint8)
    blended = Image.blend(gray.convert("RGB"), Image.fromarray(lut[levels]), alpha)
    with atomic_path(path) as tmp:
        blended.save(tmp, format="PNG")


def central_lung_fraction(cam: np.ndarray, box: tuple[float, float, float, float] = CENTRAL_LUNG_BOX) -> float:
    """Share of the CAM's mass inside ``box``, relative (x0, y0, x1, y1) of the map.

    A crude check that the evidence lies on the lungs rather than on markers or borders;
    a uniform map scores the box's area (0.525 for the default box; 0.522 on a 224 px grid), the baseline.

    Returns:
        A float in [0, 1]; NaN for a map with no mass (the share is undefined).

    Raises:
        ValueError: ``cam`` is not 2-D, or ``box`` is not 0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1.
    """
    cam = np.asarray(cam, dtype=np.float64)
    if cam.ndim != 2:
        raise ValueError(f"cam must be a 2-D array, got shape {cam.shape}")
    r0, c0, r1, c1 = box_pixels(cam.shape, box)
    total = cam.sum()
    if not total > 0:
        return float("nan")
    return float(cam[r0:r1, c0:c1].sum() / total)


def box_pixels(shape: tuple[int, int], box: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    """The rows and columns (r0, c0, r1, c1), end-exclusive, that a relative box covers in a (h, w) map.

    Raises:
        ValueError: ``box`` is not 0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1.
    """
    x0, y0, x1, y1 = box
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise ValueError(f"box must be relative (x0, y0, x1, y1) with 0 <= x0 < x1 <= 1 and "
                         f"0 <= y0 < y1 <= 1, got {box}")
    h, w = shape
    return round(y0 * h), round(x0 * w), round(y1 * h), round(x1 * w)
