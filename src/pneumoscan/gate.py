"""Out-of-scope gate: refuse inputs that are not frontal chest radiographs.

Two stages, both fitted from data and stored in the checkpoint:
1. image statistics at original geometry: a blank/uniform image (tiny pixel spread) or a
   colour image (radiographs are grayscale) is refused before the model runs;
2. feature distance: the Mahalanobis distance (class-conditional means, one shared,
   shrunk covariance; Lee et al. 2018) of the model's pooled features to the training
   radiographs. Above a threshold set at a high quantile of the validation distances,
   the input is refused as unlike anything the model was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Radiographs (and their 8 RGB-JPEG copies in fullres_sample) have colourfulness ~0; photos 20-100.
DEFAULT_MAX_COLORFULNESS = 12.0
# Pixel standard deviation (0-255) under which an image carries no radiograph.
DEFAULT_MIN_STD = 8.0


@dataclass
class GateVerdict:
    """Whether an input is in scope; ``reason`` says why not."""

    in_scope: bool
    reason: str = ""
    distance: float | None = None


class OutOfScopeGate:
    """A fitted gate; ``to_dict``/``from_dict`` store it in a checkpoint (tensors and floats only)."""

    def __init__(self, means: torch.Tensor, precision: torch.Tensor, threshold: float,
                 min_std: float = DEFAULT_MIN_STD, max_colorfulness: float = DEFAULT_MAX_COLORFULNESS,
                 quantile: float = 0.995) -> None:
        self.means = means.double()
        self.precision = precision.double()
        self.threshold = float(threshold)
        self.min_std = float(min_std)
        self.max_colorfulness = float(max_colorfulness)
        self.quantile = float(quantile)

    @classmethod
    def fit(cls, train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
            quantile: float = 0.995, shrinkage: float = 0.1) -> OutOfScopeGate:
        """Class means and shrunk tied covariance from training features; threshold from validation."""
        x = train_feats.double()
        labels = train_labels.long()
        means = torch.stack([x[labels == k].mean(0) for k in range(int(labels.max()) + 1)])
        centred = x - means[labels]
        cov = centred.T @ centred / max(len(x) - 1, 1)
        d = cov.shape[0]
        cov = (1 - shrinkage) * cov + shrinkage * torch.trace(cov) / d * torch.eye(d, dtype=cov.dtype)
        gate = cls(means, torch.linalg.inv(cov), threshold=float("inf"), quantile=quantile)
        gate.threshold = float(np.quantile(gate.distances(val_feats).numpy(), quantile))
        return gate

    def distances(self, feats: torch.Tensor) -> torch.Tensor:
        """Smallest class-conditional Mahalanobis distance of each feature row."""
        diff = feats.double()[:, None, :] - self.means[None]  # (N, K, D)
        d2 = torch.einsum("nkd,de,nke->nk", diff, self.precision, diff)
        return d2.clamp_min(0).min(dim=1).values.sqrt()

    def check_pixels(self, gray: np.ndarray, colour: float) -> GateVerdict:
        """Stage 1 on the original-geometry grayscale pixels and the source's colourfulness."""
        spread = float(gray.std())
        if spread < self.min_std:
            return GateVerdict(False, f"out of scope: blank or uniform image (pixel standard deviation "
                                      f"{spread:.1f} < {self.min_std:.0f}); a chest radiograph is expected")
        if colour > self.max_colorfulness:
            return GateVerdict(False, f"out of scope: colour image (colourfulness {colour:.1f} > "
                                      f"{self.max_colorfulness:.0f}); chest radiographs are grayscale")
        return GateVerdict(True)

    def check_features(self, feats: torch.Tensor) -> list[GateVerdict]:
        """Stage 2 for a batch of pooled features."""
        out = []
        for dist in self.distances(feats).tolist():
            if dist > self.threshold:
                out.append(GateVerdict(False, f"out of scope: image unlike the chest radiographs the model was "
                                              f"trained on (feature distance {dist:.1f} > {self.threshold:.1f}, "
                                              f"the {self.quantile:.1%} quantile on validation radiographs)",
                                       dist))
            else:
                out.append(GateVerdict(True, "", dist))
        return out

    def to_dict(self) -> dict:
        return {"means": self.means.float(), "precision": self.precision.float(), "threshold": self.threshold,
                "min_std": self.min_std, "max_colorfulness": self.max_colorfulness, "quantile": self.quantile}

    @classmethod
    def from_dict(cls, d: dict) -> OutOfScopeGate:
        return cls(d["means"], d["precision"], d["threshold"], d["min_std"], d["max_colorfulness"],
                   d.get("quantile", 0.995))
