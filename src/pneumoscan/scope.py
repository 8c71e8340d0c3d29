"""Scope classifier: is this a frontal chest radiograph of a child, and if not, what is it?

The out-of-scope gate (``gate.py``) measures how far an input's features lie from the training
radiographs; fitted on positives only, it lets through inputs that are close to them: radiographs
of other body parts, lateral chest films, adult chest films, grayscale photos of faces. This module
adds a classifier trained with outlier exposure (Hendrycks et al. 2019) on what every input
already gets: the model's five spatially pooled block features (log1p) and cheap statistics of the
224 px model-input pixels (an 8x8 thumbnail for the layout the pooled features lose, a 16-bin
histogram, left-right and up-down symmetry, edge energy, clipped-pixel fractions). Its classes are
``SCOPE_CLASSES``; the input is refused when P(in scope) falls below a threshold chosen on
held-out pediatric films, and the reason names the most likely of the other classes.

A classifier is tied to the model whose features it was fitted on (``model_digest``); a retrained
model needs a refit (``experiments/fit_scope.py``), except one whose convolutional blocks were all frozen
(``train --freeze_blocks 5``): its features are bit for bit those of the model it started from, so
training carries that model's classifier over, tied to the convolutional weights only (``features_digest``).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

KIND = "scope-softmax-v1"
IN_SCOPE = "in_scope"
SCOPE_CLASSES = (IN_SCOPE, "adult_frontal", "lateral", "other_body", "altered_chest", "non_radiograph")
# The words "outside the validated population" and "lateral" are what users (and tests) look for.
REASONS = {
    "adult_frontal": "outside the validated population: looks like an adult chest film, and the model is "
                     "validated on children aged 1-5 only",
    "lateral": "looks like a lateral view; only frontal (PA/AP) chest radiographs are supported",
    "other_body": "looks like a radiograph of another body part; a frontal chest radiograph is expected",
    "altered_chest": "looks like a rotated, inverted or cut-off chest film; an upright, whole frontal chest "
                     "radiograph is expected",
    "non_radiograph": "not a radiograph (a photo, document, screenshot, drawing or another kind of imaging)",
}
THUMB = 8
HIST_BINS = 16


def model_digest(model_state: dict, prefix: str = "") -> str:
    """sha256 (first 16 hex digits) of a model's weights (those whose names start with ``prefix``): which
    features a classifier was fitted on."""
    h = hashlib.sha256()
    for name in sorted(k for k in model_state if k.startswith(prefix)):
        t = model_state[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


FEATURE_PREFIX = "features."  # MedicalCNN's convolutional blocks: everything the pooled block features depend on


def features_digest(model_state: dict) -> str:
    """``model_digest`` of the convolutional blocks only: equal for two models whose pooled features are equal."""
    return model_digest(model_state, FEATURE_PREFIX)


# How far below the first kept film's P(in scope) the threshold lies, in log-odds (at most; never below
# the midpoint to the last refused film): the same classifier on another CPU or on int8 features moves a
# film's value by far less, and out-of-scope inputs are rarely that close (docs/experiments.md, "A scope
# threshold with a margin").
THRESHOLD_MARGIN = 0.05


def threshold_refusing(p_in: np.ndarray, k: int, margin: float = THRESHOLD_MARGIN) -> float:
    """A threshold that refuses (``p < threshold``) the ``k`` smallest of ``p_in`` and no more.

    It lies ``margin`` log-odds below the (k+1)-th smallest value, or midway between the k-th and the
    (k+1)-th where they are closer than that; not on the (k+1)-th itself, where a film is refused or not by
    the last bit of a float, which another CPU's arithmetic or the int8 backend's features can flip.
    Where the k-th equals the (k+1)-th, fewer are refused (down to the last value below them): no
    threshold separates equal values. ``k <= 0`` refuses nothing, ``k >= len(p_in)`` everything.
    """
    p = np.sort(np.asarray(p_in, dtype=np.float64).ravel())
    if not len(p):
        raise ValueError("no in-scope values to set a threshold on")
    k = min(max(int(k), 0), len(p))
    if k == len(p):  # the next float32 above the largest: above it in float32 comparisons too
        return float(np.nextafter(np.float32(p[-1]), np.float32(np.inf)))
    while k > 0 and p[k - 1] == p[k]:
        k -= 1
    lower = p[k - 1] if k > 0 else 0.0
    below = p[k] / (p[k] + (1.0 - p[k]) * np.exp(margin))  # sigmoid(logit(p) - margin), exact at 0 and 1
    return float(max((lower + p[k]) / 2, below))


def _corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a - a.mean(dim=(1, 2), keepdim=True)
    b = b - b.mean(dim=(1, 2), keepdim=True)
    return (a * b).sum(dim=(1, 2)) / ((a.square().sum(dim=(1, 2)) * b.square().sum(dim=(1, 2))).sqrt() + 1e-6)


def pixel_features(pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Layout and intensity statistics of uint8 (N, S, S) model-input images: (N, 64 + 16 + 8) float32."""
    p = torch.as_tensor(pixels)
    x = p.float().div(255.0)
    thumb = F.adaptive_avg_pool2d(x[:, None], THUMB).flatten(1)
    idx = (p.flatten(1).long() * HIST_BINS) // 256
    hist = torch.zeros(len(p), HIST_BINS).scatter_add_(1, idx, torch.ones(idx.shape)) / idx.shape[1]
    stats = torch.stack([
        x.mean(dim=(1, 2)), x.std(dim=(1, 2)),
        _corr(x, x.flip(-1)), _corr(x, x.flip(-2)),
        (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=(1, 2)), (x[:, 1:] - x[:, :-1]).abs().mean(dim=(1, 2)),
        (p <= 2).float().mean(dim=(1, 2)), (p >= 253).float().mean(dim=(1, 2)),
    ], dim=1)
    return torch.cat([thumb, hist, stats], dim=1)


def scope_inputs(block_features: list[torch.Tensor], pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The classifier's input: log1p of every block's pooled features, then ``pixel_features``."""
    return torch.cat([torch.log1p(f.float().clamp_min(0)) for f in block_features] + [pixel_features(pixels)], 1)


def _forward(z: torch.Tensor, layers: list[torch.Tensor]) -> torch.Tensor:
    """Logits of standardised inputs through (weight, bias) pairs, ReLU between them."""
    for i in range(0, len(layers), 2):
        z = F.linear(z, layers[i], layers[i + 1])
        if i + 2 < len(layers):
            z = torch.relu(z)
    return z


@dataclass
class ScopeVerdict:
    """The classifier's answer for one input: ``category`` is ``in_scope`` or the most likely other class."""

    in_scope: bool
    category: str
    p_in_scope: float
    reason: str = ""


class ScopeClassifier:
    """Standardisation, then a linear layer (``hidden`` 0) or one hidden ReLU layer, then softmax over classes.

    ``to_dict``/``from_dict`` store it in a checkpoint as tensors, lists, strings and floats only.
    """

    def __init__(self, classes: list[str], mean: torch.Tensor, std: torch.Tensor, layers: list[torch.Tensor],
                 threshold: float, model_digest: str = "", info: dict | None = None,
                 features_digest: str = "") -> None:
        if IN_SCOPE not in classes:
            raise ValueError(f"scope classes must include {IN_SCOPE!r}, got {classes}")
        self.classes = list(classes)
        self.mean, self.std = mean.float(), std.float()
        self.layers = [t.float() for t in layers]  # weight, bias[, weight, bias]
        self.threshold = float(threshold)
        self.model_digest = model_digest
        self.features_digest = features_digest  # set only when carried over to a head-only retrain
        self.info = dict(info or {})

    def fits(self, model_state: dict) -> bool:
        """Whether ``model_state`` computes the features this classifier was fitted on."""
        if self.features_digest:
            return self.features_digest == features_digest(model_state)
        return self.model_digest == model_digest(model_state)

    @property
    def in_index(self) -> int:
        return self.classes.index(IN_SCOPE)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return _forward((x.float() - self.mean) / self.std, self.layers)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, K) for classifier inputs (``scope_inputs``)."""
        return torch.softmax(self.logits(x), dim=1)

    def check(self, block_features: list[torch.Tensor], pixels: torch.Tensor | np.ndarray) -> list[ScopeVerdict]:
        """A verdict for each input of a batch (pooled block features and uint8 model-input pixels)."""
        probs = self.probabilities(scope_inputs(block_features, pixels))
        out = []
        for row in probs:
            p_in = float(row[self.in_index])
            if p_in >= self.threshold:
                out.append(ScopeVerdict(True, IN_SCOPE, p_in))
                continue
            others = row.clone()
            others[self.in_index] = -1.0
            k = int(others.argmax())
            category = self.classes[k]
            reason = REASONS.get(category, f"looks like {category}")
            out.append(ScopeVerdict(False, category, p_in,
                                    f"{reason} (scope classifier: P(frontal pediatric chest film) {p_in:.2f} < "
                                    f"{self.threshold:.2f}; most likely {category.replace('_', ' ')}, "
                                    f"{float(row[k]):.2f})"))
        return out

    @classmethod
    def fit(cls, x: torch.Tensor, y: torch.Tensor, classes: list[str], hidden: int = 0, weight_decay: float = 1e-4,
            max_iter: int = 500, seed: int = 0) -> ScopeClassifier:
        """Fit on inputs ``x`` (N, D) and class indices ``y`` by full-batch L-BFGS; each class gets the same
        total weight, and ``weight_decay`` times the squared weights is added to the mean loss.

        The threshold is left at 0.5; set it with ``set_threshold`` on held-out in-scope inputs.
        """
        gen = torch.Generator().manual_seed(seed)
        x = x.float()
        mean, std = x.mean(0), x.std(0).clamp_min(1e-4)
        z = (x - mean) / std
        k = len(classes)
        counts = torch.bincount(y, minlength=k).float()
        w = (1.0 / (k * counts.clamp_min(1)))[y]  # sums to 1 over the classes present
        dims = [z.shape[1], hidden, k] if hidden else [z.shape[1], k]
        params: list[torch.Tensor] = []
        for a, b in zip(dims[:-1], dims[1:]):
            weight = torch.zeros(b, a)
            if hidden:  # a linear model is convex and starts at zero; a hidden layer needs symmetry broken
                torch.nn.init.kaiming_uniform_(weight, a=5 ** 0.5, generator=gen)
            params += [weight.requires_grad_(), torch.zeros(b, requires_grad=True)]
        opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, history_size=10, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-6, tolerance_change=1e-10)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = (F.cross_entropy(_forward(z, params), y, reduction="none") * w).sum()
            loss = loss + weight_decay * sum(p.square().sum() for p in params[0::2])
            loss.backward()
            return loss

        opt.step(closure)
        return cls(list(classes), mean, std, [p.detach().clone() for p in params], 0.5)

    def set_threshold(self, x_in_scope: torch.Tensor, max_refused: float) -> float:
        """Set the threshold so that at most ``max_refused`` of held-out in-scope inputs are refused."""
        p_in = self.probabilities(x_in_scope)[:, self.in_index].double().numpy()
        self.threshold = threshold_refusing(p_in, int(np.floor(max_refused * len(p_in))))
        return self.threshold

    def to_dict(self) -> dict:
        return {"kind": KIND, "classes": self.classes, "mean": self.mean, "std": self.std, "layers": self.layers,
                "threshold": self.threshold, "model_digest": self.model_digest, "info": self.info,
                "features_digest": self.features_digest}

    @classmethod
    def from_dict(cls, d: dict) -> ScopeClassifier:
        """Rebuild a stored classifier.

        Raises:
            ValueError: the stored classifier is of another kind (refit it: experiments/fit_scope.py).
        """
        if d.get("kind") != KIND:
            raise ValueError(f"the checkpoint's scope classifier is of kind {d.get('kind')!r}, not {KIND!r}; "
                             f"refit it with experiments/fit_scope.py")
        return cls(d["classes"], d["mean"], d["std"], list(d["layers"]), d["threshold"], d.get("model_digest", ""),
                   d.get("info"), d.get("features_digest", ""))
