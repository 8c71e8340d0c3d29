"""Out-of-scope gate: refuse inputs that are not frontal chest radiographs.

Two stages, both fitted from data and stored in the checkpoint:
1. image statistics at original geometry: a blank/uniform image (tiny pixel spread) or a
   colour image (radiographs are grayscale) is refused before the model runs;
2. feature distance: for several blocks of the network, the Mahalanobis distance (class-
   conditional means, one shared, shrunk covariance; Lee et al. 2018) of the block's spatially
   pooled features to the training radiographs, each divided by its own validation quantile;
   the largest of these is the input's score. Early blocks see texture and intensity
   statistics (photos, maps, MR), the last one content; a score above the same quantile of
   the validation radiographs' scores is refused.

Beside them, a **detail check** that refuses nothing: the fine detail of the model input (mean absolute
Laplacian over the pixel spread, ``detail_ratio``) against the training films' 0.1 % quantile. A
downscaled-then-enlarged or blurred copy falls far below it; such a result is answered with a "low detail"
warning, and a refusal's reason says that the detail was lost (the scope classifier reads lost detail as
an adult film: docs/scope.md).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import TrainingError

log = logging.getLogger(__name__)

# Radiographs (and their 8 RGB-JPEG copies in fullres_sample) have colourfulness ~0; photos 20-100.
DEFAULT_MAX_COLORFULNESS = 12.0
# Pixel standard deviation (0-255) under which an image carries no radiograph.
DEFAULT_MIN_STD = 8.0
# Shortest side (pixels, as stored in the file) under which an input is a thumbnail or a crop, not a film: every
# valid film here is at least 157 px a side (fullres_sample), the data set's copies 224 px.
MIN_SIDE = 64
# Blocks 2-5 of MedicalCNN (indices into model.features). The last block alone missed grayscale
# photos, MR slices and elevation maps; with blocks 2-4 added it caught them (docs/gate.md).
DEFAULT_LAYERS = (1, 2, 3, 4)


# Precision matrices wider than this are stored as their upper triangle (a symmetric matrix, half the bytes): a
# MedicalCNN's widest block (512) stays whole, an ensemble's side-by-side features (1024 for two) are packed, which
# keeps a two-network checkpoint under the 25 MB the shipped weights may take. Readers unpack either.
PACK_ABOVE_DIM = 512


def pack_symmetric(m: torch.Tensor) -> torch.Tensor:
    """The upper triangle (diagonal included) of a square matrix, row by row, as float32."""
    rows, cols = torch.triu_indices(m.shape[0], m.shape[1])
    return m.float()[rows, cols].clone()


def unpack_symmetric(v: torch.Tensor, dim: int) -> torch.Tensor:
    """The symmetric ``dim`` x ``dim`` matrix whose upper triangle ``pack_symmetric`` gave.

    Raises:
        ValueError: ``v`` does not hold dim * (dim + 1) / 2 values.
    """
    if v.dim() != 1 or v.numel() != dim * (dim + 1) // 2:
        raise ValueError(f"a packed {dim}x{dim} symmetric matrix has {dim * (dim + 1) // 2} values, got "
                         f"{tuple(v.shape)}")
    rows, cols = torch.triu_indices(dim, dim)
    m = torch.zeros(dim, dim, dtype=v.dtype)
    m[rows, cols] = v
    m[cols, rows] = v
    return m


def has_packed_precisions(gate: dict | None) -> bool:
    """Whether a stored gate holds packed precision matrices (only a pneumoscan that unpacks them reads it)."""
    return any(p.dim() == 1 for p in (gate or {}).get("precisions", []))


# Share of the training films whose detail ratio may fall below the stored floor.
DETAIL_QUANTILE = 0.001
# Below this many validation films the limit (their 99.5 % quantile) is about their largest score, and about
# 1 / (n + 1) of valid films score above the largest of n: 14 % for 6 films, 0.5 % only from about 200.
MIN_FIT_FILMS = 200


def small_fit_note(n: int) -> str | None:
    """What a gate limit fitted on ``n`` validation films costs, where they are fewer than ``MIN_FIT_FILMS``."""
    if n >= MIN_FIT_FILMS:
        return None
    return (f"the out-of-scope gate's limit was fitted on only {n} validation films (fewer than {MIN_FIT_FILMS}): it "
            f"is about their largest score, so about 1 in {n + 1} ({1 / (n + 1):.1%}) valid films will score above "
            f"it and be refused; give more validation films (--val_fraction, or a larger val/)")


def detail_ratio(pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Fine detail of uint8 (N, S, S) model-input images: mean |4-neighbour Laplacian| over the pixel standard
    deviation (both in grey levels; 0 for a flat image). Invariant to brightness and contrast; a 224 px film
    taken down to 25 % and enlarged again smoothly keeps about a quarter of it (docs/gate.md, "Detail check").

    Raises:
        ValueError: images smaller than 3 x 3 pixels (no Laplacian).
    """
    x = torch.as_tensor(pixels)
    if x.ndim != 3 or min(x.shape[1:]) < 3:
        raise ValueError(f"detail_ratio needs (N, S, S) images of at least 3 x 3 pixels, got {tuple(x.shape)}")
    x = x.to(torch.int32)  # exact: a flat image has no detail at all
    lap = (4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]).abs()
    return lap.float().mean(dim=(1, 2)) / x.float().std(dim=(1, 2)).clamp_min(1.0)


@dataclass
class GateVerdict:
    """Whether an input is in scope; ``reason`` says why not."""

    in_scope: bool
    reason: str = ""
    score: float | None = None


def _mahalanobis_fit(x: torch.Tensor, labels: torch.Tensor, shrinkage: float) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.double()
    means = torch.stack([x[labels == k].mean(0) for k in range(int(labels.max()) + 1)])
    centred = x - means[labels]
    cov = centred.T @ centred / max(len(x) - 1, 1)
    d = cov.shape[0]
    if not bool(torch.isfinite(cov).all()) or float(torch.trace(cov)) <= 0.0:
        raise TrainingError("the model's features do not vary between films (collapsed, or not finite): it "
                            "cannot tell films apart and no out-of-scope gate can be fitted on it; train again "
                            "with a lower --lr")
    cov = (1 - shrinkage) * cov + shrinkage * torch.trace(cov) / d * torch.eye(d, dtype=cov.dtype)
    return means, torch.linalg.inv(cov)


def _mahalanobis(x: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Smallest class-conditional Mahalanobis distance of each row of ``x``."""
    diff = x.double()[:, None, :] - means.double()[None]  # (N, K, D)
    d2 = torch.einsum("nkd,de,nke->nk", diff, precision.double(), diff)
    return d2.clamp_min(0).min(dim=1).values.sqrt()


class OutOfScopeGate:
    """A fitted gate; ``to_dict``/``from_dict`` store it in a checkpoint (tensors, lists and floats only)."""

    def __init__(self, layers: list[int], means: list[torch.Tensor], precisions: list[torch.Tensor],
                 scales: list[float], threshold: float, min_std: float = DEFAULT_MIN_STD,
                 max_colorfulness: float = DEFAULT_MAX_COLORFULNESS, quantile: float = 0.995,
                 fitted_on: str = "validation radiographs", base_threshold: float | None = None,
                 reference: dict[str, list[float]] | None = None, min_detail: float | None = None,
                 detail_quantile: float = DETAIL_QUANTILE) -> None:
        self.layers = [int(i) for i in layers]
        self.means = means
        self.precisions = precisions
        self.scales = [float(s) for s in scales]
        self.threshold = float(threshold)
        self.min_std = float(min_std)
        self.max_colorfulness = float(max_colorfulness)
        self.quantile = float(quantile)
        self.fitted_on = str(fitted_on)  # whose films the limit is the quantile of (a site's after calibrate)
        self.base_threshold = float(threshold if base_threshold is None else base_threshold)  # the training limit
        # Scores of labelled out-of-scope sets (name -> one score per input), stored when the gate was fitted, so
        # that a raised limit can say how many of them the distance stage alone would no longer catch.
        if reference is not None and not isinstance(reference, dict):
            raise ValueError(f"the gate's reference scores must map a set's name to its scores, got "
                             f"{type(reference).__name__}")
        self.reference = {str(k): [float(v) for v in vs] for k, vs in (reference or {}).items()}
        # the training films' DETAIL_QUANTILE of ``detail_ratio`` (None: no detail check; ``fit_detail`` sets it)
        self.min_detail = None if min_detail is None else float(min_detail)
        self.detail_quantile = float(detail_quantile)

    @classmethod
    def fit(cls, train_feats: list[torch.Tensor], train_labels: torch.Tensor, val_feats: list[torch.Tensor],
            layers: tuple[int, ...] = DEFAULT_LAYERS, quantile: float = 0.995, shrinkage: float = 0.1
            ) -> OutOfScopeGate:
        """Per-block class means and covariance from training features; scales and threshold from validation."""
        layers = tuple(i for i in layers if i < len(train_feats)) or (len(train_feats) - 1,)
        means, precisions, scales = [], [], []
        for i in layers:
            m, prec = _mahalanobis_fit(train_feats[i], train_labels.long(), shrinkage)
            means.append(m)
            precisions.append(prec)
            scales.append(float(np.quantile(_mahalanobis(val_feats[i], m, prec).numpy(), quantile)))
        gate = cls(list(layers), means, precisions, scales, threshold=float("inf"), quantile=quantile)
        # The limit is also the training limit a site's refit is capped against (and its ratio reported by).
        gate.threshold = gate.base_threshold = float(np.quantile(gate.scores(val_feats).numpy(), quantile))
        return gate

    def scores(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Each input's largest per-block distance, in units of that block's validation quantile."""
        per_layer = [_mahalanobis(feats[i], m, p) / s
                     for i, m, p, s in zip(self.layers, self.means, self.precisions, self.scales)]
        return torch.stack(per_layer).max(dim=0).values

    def fit_detail(self, train_pixels: torch.Tensor | np.ndarray, quantile: float = DETAIL_QUANTILE,
                   batch: int = 512) -> float:
        """Set the detail floor to ``quantile`` of the training films' ``detail_ratio``; returns it."""
        ratios = torch.cat([detail_ratio(train_pixels[i:i + batch]) for i in range(0, len(train_pixels), batch)])
        self.min_detail, self.detail_quantile = float(np.quantile(ratios.numpy(), quantile)), float(quantile)
        return self.min_detail

    def low_detail(self, pixels: torch.Tensor | np.ndarray) -> list[str]:
        """For each model input, "" or how its fine detail falls below the training films'."""
        if self.min_detail is None:
            return [""] * len(pixels)
        return ["" if r >= self.min_detail else
                f"much less fine detail than the training films, as in a downscaled or blurred copy (detail ratio "
                f"{r:.3f}; {self.detail_quantile:.1%} of the training films are below {self.min_detail:.3f})"
                for r in detail_ratio(pixels).tolist()]

    def reference_caught(self, limit: float | None = None) -> dict[str, dict]:
        """For each stored reference set, how many of its inputs score above ``limit`` (default: this gate's)."""
        limit = self.threshold if limit is None else float(limit)
        return {name: {"n": len(v), "above": int(sum(s > limit for s in v))} for name, v in self.reference.items()}

    def check_pixels(self, gray: np.ndarray, colour: float, size: tuple[int, int] | None = None) -> GateVerdict:
        """Stage 1 on the original-geometry grayscale pixels, the source's colourfulness and its size in pixels
        (width, height as stored, before any reduced decoding; default: the pixels' own)."""
        width, height = size or (gray.shape[1], gray.shape[0])
        if min(width, height) < MIN_SIDE:
            return GateVerdict(False, f"out of scope: image too small ({width}x{height} pixels; at least {MIN_SIDE} "
                                      f"a side expected): send the original film, not a thumbnail or a crop")
        spread = float(gray.std())
        if spread < self.min_std:
            return GateVerdict(False, f"out of scope: blank or uniform image (pixel standard deviation "
                                      f"{spread:.1f} < {self.min_std:.0f}); a chest radiograph is expected")
        if colour > self.max_colorfulness:
            return GateVerdict(False, f"out of scope: colour image (colourfulness {colour:.1f} > "
                                      f"{self.max_colorfulness:.0f}); chest radiographs are grayscale")
        return GateVerdict(True)

    def check_features(self, feats: list[torch.Tensor]) -> list[GateVerdict]:
        """Stage 2 for a batch: ``feats`` as returned by ``predict_outputs`` (one tensor per block)."""
        out = []
        for score in self.scores(feats).tolist():
            if score > self.threshold:
                out.append(GateVerdict(False, f"out of scope: image unlike the chest radiographs the model was "
                                              f"trained on (feature distance score {score:.2f} > {self.threshold:.2f},"
                                              f" the {self.quantile:.1%} quantile on {self.fitted_on})", score))
            else:
                out.append(GateVerdict(True, "", score))
        return out

    def to_dict(self) -> dict:
        return {"kind": "multi-layer-mahalanobis", "layers": self.layers,
                "means": [m.float() for m in self.means],
                "precisions": [pack_symmetric(p) if p.shape[0] > PACK_ABOVE_DIM else p.float()
                               for p in self.precisions],
                "scales": self.scales, "threshold": self.threshold, "min_std": self.min_std,
                "max_colorfulness": self.max_colorfulness, "quantile": self.quantile, "fitted_on": self.fitted_on,
                "base_threshold": self.base_threshold, **({"reference": self.reference} if self.reference else {}),
                **({"min_detail": self.min_detail, "detail_quantile": self.detail_quantile}
                   if self.min_detail is not None else {})}

    @classmethod
    def from_dict(cls, d: dict) -> OutOfScopeGate:
        """Rebuild a stored gate.

        Raises:
            ValueError: the stored gate is of an older kind (refit it: experiments/recalibrate.py).
        """
        if d.get("kind") != "multi-layer-mahalanobis":
            raise ValueError("the checkpoint's out-of-scope gate is of an older kind; refit it with "
                             "experiments/recalibrate.py")
        base = d.get("base_threshold")
        if base is not None and not math.isfinite(float(base)):
            # ``fit`` stored an infinite training limit until 2026-12-02 (so --refit_gate had no cap): take the
            # stored limit instead, which is the training one unless such a checkpoint was already site-refitted.
            base = None
            if d.get("fitted_on", "validation radiographs") != "validation radiographs":
                log.warning("this checkpoint's gate limit was set on %s and its training limit was not stored; "
                            "calibrate --refit_gate will cap and compare against the site limit", d["fitted_on"])
        precisions = [unpack_symmetric(p, int(m.shape[-1])) if p.dim() == 1 else p
                      for p, m in zip(d["precisions"], d["means"])]
        return cls(d["layers"], d["means"], precisions, d["scales"], d["threshold"], d["min_std"],
                   d["max_colorfulness"], d.get("quantile", 0.995), d.get("fitted_on", "validation radiographs"),
                   base, d.get("reference"), d.get("min_detail"), d.get("detail_quantile", DETAIL_QUANTILE))
