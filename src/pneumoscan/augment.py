"""Batched augmentation for radiographs, on whatever device the batch lives.

Small rotations, scaling and shifts (a patient is never positioned twice alike),
brightness/contrast (exposure differs between machines) and sensor noise. No
left-right flip: the heart is on the left, and a flipped film is not a real one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LEVELS: dict[str, dict[str, float] | None] = {
    "none": None,
    "light": {"rotate": 5.0, "scale": 0.05, "translate": 0.04, "brightness": 0.08,
              "contrast": 0.10, "noise": 0.01},
    "strong": {"rotate": 10.0, "scale": 0.12, "translate": 0.08, "brightness": 0.15,
               "contrast": 0.20, "noise": 0.03},
}


def _uniform(n: int, bound: float, gen: torch.Generator, device) -> torch.Tensor:
    return (torch.rand(n, generator=gen, device=device) * 2 - 1) * bound


def augment_batch(x: torch.Tensor, level: str, gen: torch.Generator) -> torch.Tensor:
    """Augment float images in [0, 1] shaped (N, 1, H, W); returns a new tensor in [0, 1]."""
    params = LEVELS[level]
    if params is None:
        return x
    n, device = x.shape[0], x.device
    angle = _uniform(n, math.radians(params["rotate"]), gen, device)
    scale = 1.0 + _uniform(n, params["scale"], gen, device)
    shift = torch.stack([_uniform(n, 2 * params["translate"], gen, device) for _ in range(2)], 1)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    contrast = (1.0 + _uniform(n, params["contrast"], gen, device)).view(n, 1, 1, 1)
    brightness = _uniform(n, params["brightness"], gen, device).view(n, 1, 1, 1)
    mean = x.mean(dim=(2, 3), keepdim=True)
    x = (x - mean) * contrast + mean + brightness
    if params["noise"] > 0:
        x = x + torch.randn(x.shape, generator=gen, device=device) * params["noise"]
    return x.clamp_(0.0, 1.0)
