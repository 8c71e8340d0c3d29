"""The one forward path: uint8 image -> model input -> logits, calibrated probabilities, gate features.

Training (validation passes), evaluation, folder and single-image inference, Grad-CAM,
the service and the fast backends all go through ``InputSpec`` and ``Predictor``, so the
input a model sees and the probability a user reads are computed in exactly one place.

``InputSpec`` is the input contract a checkpoint carries: square size, normalisation,
channel count and preprocessing version.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

from .calibration import calibrated_probs
from .errors import CheckpointError
from .heatmap import grad_cam
from .preprocess import INTENSITIES, PREPROCESS_VERSION, equalize, resize_gray

log = logging.getLogger(__name__)

# Index 1 is the positive class everywhere (metrics, thresholds, P(PNEUMONIA)).
CLASS_NAMES = ("NORMAL", "PNEUMONIA")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(name)


@dataclass(frozen=True)
class InputSpec:
    """What a model expects: ``image_size`` x ``image_size`` grayscale scaled to [0, 1], equalised per
    film when ``intensity`` is ``equalize``, then ``(x - mean) / std``, replicated to ``in_channels``,
    made by preprocessing ``preprocess``."""

    image_size: int
    mean: float
    std: float
    in_channels: int
    preprocess: str = PREPROCESS_VERSION
    intensity: str = "raw"

    def __post_init__(self) -> None:
        if self.image_size < 32 or self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32 (>= 32), got {self.image_size}")
        if not self.std > 0:
            raise ValueError(f"normalisation std must be positive, got {self.std}")
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if self.intensity not in INTENSITIES:
            raise ValueError(f"unknown intensity {self.intensity!r}; choose one of {', '.join(INTENSITIES)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        return cls(int(d["image_size"]), float(d["mean"]), float(d["std"]), int(d["in_channels"]),
                   str(d.get("preprocess", PREPROCESS_VERSION)), str(d.get("intensity", "raw")))

    def pixels(self, gray: Image.Image) -> np.ndarray:
        """The uint8 (S, S) array the model sees for a grayscale image at any geometry."""
        return resize_gray(gray, self.image_size)

    def scaled(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, S, S) or float [0, 1] (N, 1, S, S) images as float (N, 1, S, S) in [0, 1], equalised
        per film when the model was trained so: the grey levels the model sees, before normalisation."""
        x = images.float().div_(255.0).unsqueeze(1) if images.dtype == torch.uint8 else images
        return equalize(x) if self.intensity == "equalize" else x

    def to_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, S, S) or float [0, 1] (N, 1, S, S) images to the normalised (N, C, S, S) input."""
        x = (self.scaled(images) - self.mean) / self.std
        if self.in_channels == 3:
            x = x.expand(-1, 3, -1, -1)
        return x.contiguous(memory_format=torch.channels_last)


@dataclass
class Outputs:
    """A forward pass over a batch: logits (N, 2), and per block pooled features (N, C_i) when asked."""

    logits: torch.Tensor
    features: list[torch.Tensor]


def calibration_bias(ckpt: dict) -> float:
    """A checkpoint's calibration intercept: 0 unless ``pneumoscan calibrate --intercept`` wrote one.

    Raises:
        CheckpointError: it is there but not a finite number, or there without a temperature.
    """
    value = ckpt.get("calibration_bias") or 0.0
    try:
        value = float(value)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"calibration_bias {ckpt.get('calibration_bias')!r} is not a number") from exc
    if not np.isfinite(value) or (value and ckpt.get("temperature") is None):
        raise CheckpointError(f"calibration_bias {value} is not usable (not finite, or without a temperature); "
                              f"recalibrate the model with pneumoscan calibrate")
    return value


class Predictor:
    """A model with its input contract and calibration: the only code that runs a model for outputs.

    Args:
        model: a ``MedicalCNN`` (put in eval mode, channels_last, on ``device``).
        spec: its input contract.
        temperature: the calibration temperature, or None for an uncalibrated model.
        device: where the forward pass runs; results always come back on the CPU.
        bias: the calibration's intercept (``calibration.calibrated_probs``; 0: temperature alone).
    """

    def __init__(self, model: torch.nn.Module, spec: InputSpec, temperature: float | None = None,
                 device: torch.device | str = "cpu", bias: float = 0.0) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).to(memory_format=torch.channels_last).eval()
        self.spec = spec
        self.temperature = temperature
        self.bias = float(bias)

    @classmethod
    def from_checkpoint(cls, ckpt: dict, device: torch.device | str = "cpu") -> Predictor:
        """The predictor a loaded checkpoint (``checkpoint.load_checkpoint``) describes."""
        from .checkpoint import input_spec, model_from_checkpoint

        return cls(model_from_checkpoint(ckpt), input_spec(ckpt), ckpt.get("temperature"), device,
                   calibration_bias(ckpt))

    @torch.no_grad()
    def outputs(self, images: torch.Tensor, features: bool = True, batch_size: int = 64) -> Outputs:
        """Logits (and, with ``features``, every block's spatially pooled output) for uint8 (N, S, S) images.

        The model is put in eval mode; on CUDA the pass runs in bfloat16 autocast.
        """
        self.model.eval()
        logits, feats = [], []
        for start in range(0, len(images), batch_size):
            x = self.spec.to_tensor(images[start:start + batch_size].to(self.device))
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                if features:
                    lg, pooled = self.model.forward_with_features(x)
                    feats.append([f.float().cpu() for f in pooled])
                else:
                    lg = self.model(x)
            logits.append(lg.float().cpu())
        if not logits:
            return Outputs(torch.zeros((0, 2)), [])
        return Outputs(torch.cat(logits), [torch.cat(per_block) for per_block in zip(*feats)])

    def logits(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Logits (N, 2) on the CPU for uint8 (N, S, S) images."""
        return self.outputs(images, features=False, batch_size=batch_size).logits

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, 2), float64, calibrated with this model's temperature (and intercept)."""
        return calibrated_probs(logits, self.temperature, self.bias)

    def gradcam(self, pixels: np.ndarray | torch.Tensor, target_class: int = 1) -> np.ndarray:
        """Grad-CAM (S x S, values in [0, 1]) of ``target_class`` for one uint8 (S, S) model-input image."""
        x = self.spec.to_tensor(torch.as_tensor(pixels)[None].to(self.device))
        return grad_cam(self.model, x, target_class=target_class)
