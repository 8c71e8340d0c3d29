"""Batched augmentation for radiographs, on whatever device the batch lives.

Small rotations, scaling and shifts (a patient is never positioned twice alike),
brightness/contrast (exposure differs between machines) and sensor noise. No
left-right flip: the heart is on the left, and a flipped film is not a real one.

``acquisition`` adds what differs between X-ray machines, hospitals and file handling
(issue 7): gamma and window (contrast curves), blur and sharpening (detector and
post-processing), resolution loss (a film stored small and enlarged), crop and zoom
(collimation), dark border bands and bright burned-in text markers. Never an inversion or a
90-degree turn: those make films the scope check must refuse, not films to answer.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

LEVELS: dict[str, dict[str, float] | None] = {
    "none": None,
    "light": {"rotate": 5.0, "scale": 0.05, "translate": 0.04, "brightness": 0.08,
              "contrast": 0.10, "noise": 0.01},
    "strong": {"rotate": 10.0, "scale": 0.12, "translate": 0.08, "brightness": 0.15,
               "contrast": 0.20, "noise": 0.03},
    "acquisition": {"rotate": 10.0, "scale": 0.15, "translate": 0.08, "brightness": 0.12,
                    "contrast": 0.20, "noise": 0.03, "gamma": 0.4, "window": 0.12, "sharpen": 1.5,
                    "lowres": 0.3, "border": 0.25, "marker": 0.3},
}
# ``acquisition`` plus a random aspect change: the content's width-to-height ratio multiplied by a
# factor log-uniform in [1/aspect, aspect]. The data set's films were stretched to a square from
# originals whose shape differs by class (normals nearer square), so without it a model can learn
# how much a chest is squeezed sideways instead of the lungs (docs/experiments.md, "aspect shortcut").
LEVELS["acquisition_aspect"] = {**LEVELS["acquisition"], "aspect": 1.5}


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
    sx = sy = scale
    if "aspect" in params:  # content scaled by sx sideways and sy vertically, sx / sy = the aspect factor
        ratio = torch.exp(_uniform(n, math.log(params["aspect"]), gen, device)).sqrt()
        sx, sy = scale * ratio, scale / ratio
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos / sx, -sin / sy, shift[:, 0]], 1),
                         torch.stack([sin / sx, cos / sy, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    contrast = (1.0 + _uniform(n, params["contrast"], gen, device)).view(n, 1, 1, 1)
    brightness = _uniform(n, params["brightness"], gen, device).view(n, 1, 1, 1)
    mean = x.mean(dim=(2, 3), keepdim=True)
    x = (x - mean) * contrast + mean + brightness
    if "gamma" in params:
        x = _acquisition(x.clamp(0.0, 1.0), params, gen)
    if params["noise"] > 0:
        # per-film noise level up to the bound (detectors and doses differ)
        sigma = torch.rand(n, 1, 1, 1, generator=gen, device=device) * params["noise"]
        x = x + torch.randn(x.shape, generator=gen, device=device) * sigma
    return x.clamp_(0.0, 1.0)


def mixup(x: torch.Tensor, target: torch.Tensor, alpha: float,
          rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup (Zhang et al. 2018) of a batch with a shuffled copy of itself.

    Returns ``lam * x + (1 - lam) * x[perm]``, the partners' targets ``target[perm]`` and ``lam``, drawn
    from Beta(alpha, alpha) and folded to >= 0.5, so that each mixed film is mostly its own (its own
    target stays the majority label). The loss is ``lam * loss(target) + (1 - lam) * loss(partner)``.
    """
    lam = float(rng.beta(alpha, alpha))
    lam = max(lam, 1.0 - lam)
    perm = torch.from_numpy(rng.permutation(x.shape[0])).to(x.device)
    return lam * x + (1.0 - lam) * x[perm], target[perm], lam


def _chance(n: int, p: float, gen: torch.Generator, device) -> torch.Tensor:
    """(n, 1, 1, 1) float mask: 1 for the films an effect applies to (probability ``p`` each)."""
    return (torch.rand(n, generator=gen, device=device) < p).float().view(n, 1, 1, 1)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(2 * sigma)))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))


def _acquisition(x: torch.Tensor, params: dict[str, float], gen: torch.Generator) -> torch.Tensor:
    """Contrast curves, blur/sharpening, resolution loss, border bands and text markers on [0, 1] films."""
    n, _, h, w = x.shape
    device = x.device
    # gamma in [exp(-g), exp(g)] and a random window (black and white points moved inwards)
    gamma = torch.exp(_uniform(n, params["gamma"], gen, device)).view(n, 1, 1, 1)
    x = x.clamp_min(1e-6) ** gamma
    lo = (torch.rand(n, generator=gen, device=device) * params["window"]).view(n, 1, 1, 1)
    hi = 1.0 - (torch.rand(n, generator=gen, device=device) * params["window"]).view(n, 1, 1, 1)
    x = ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
    # unsharp masking with a random signed amount: < 0 blurs (at -1 fully), > 0 sharpens
    amount = (torch.rand(n, generator=gen, device=device) * (1.0 + params["sharpen"]) - 1.0).view(n, 1, 1, 1)
    x = x + amount * (x - _gaussian_blur(x, sigma=max(1.0, h / 160)))
    # resolution loss: down to 50-85 % and back up, for a share of the films
    lowres = _chance(n, params["lowres"], gen, device)
    if lowres.any():
        factor = float(0.5 + 0.35 * torch.rand(1, generator=gen, device=device))
        small = F.interpolate(x, scale_factor=factor, mode="area")
        x = lowres * F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False) + (1 - lowres) * x
    rows = torch.arange(h, device=device).view(1, 1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, 1, w)
    # dark collimation bands on one to four sides
    if params["border"] > 0:
        for side in range(4):
            on = _chance(n, params["border"] / 2, gen, device)
            width = (torch.rand(n, generator=gen, device=device) * 0.12 * h).view(n, 1, 1, 1)
            dist = (rows, cols, h - 1 - rows, w - 1 - cols)[side]
            x = torch.where((dist < width) & (on > 0), x * 0.1, x)
    # a bright burned-in marker (letter, ruler, label) somewhere near the edge
    if params["marker"] > 0:
        on = _chance(n, params["marker"], gen, device)
        mh = (0.04 + 0.06 * torch.rand(n, generator=gen, device=device)).view(n, 1, 1, 1) * h
        mw = (0.04 + 0.12 * torch.rand(n, generator=gen, device=device)).view(n, 1, 1, 1) * w
        top = torch.where(torch.rand(n, 1, 1, 1, generator=gen, device=device) < 0.5,
                          0.02 * h, h * 0.98 - mh)
        left = torch.rand(n, 1, 1, 1, generator=gen, device=device) * (w - mw)
        box = (rows >= top) & (rows < top + mh) & (cols >= left) & (cols < left + mw) & (on > 0)
        x = torch.where(box, torch.full_like(x, 0.95), x)
    return x
