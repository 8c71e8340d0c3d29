"""Prediction on single images and folders: ``MedicalImageInference`` and its result types.

One ``MedicalImageInference`` holds a model for its lifetime (a service keeps one);
every image goes through the same preprocessing as training, read from the
checkpoint. One bad file yields an ``InferenceFailure`` and never stops a batch.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from .checkpoint import default_model_path, load_checkpoint, model_from_checkpoint
from .errors import DataError, ImageError
from .evaluate import predict_logits, resolve_device
from .preprocess import is_image_file, load_image

log = logging.getLogger(__name__)

RISK_LOW, RISK_MEDIUM, RISK_HIGH = "LOW", "MEDIUM", "HIGH"


@dataclass
class InferenceResult:
    """One prediction. The first seven fields are the seed's; the rest say how it was made."""

    prediction: str
    confidence: float
    probabilities: dict[str, float]
    risk_level: str
    uncertainty: float
    processing_time: float
    timestamp: str
    image_path: str | None = None
    threshold: float = 0.5
    calibrated: bool = False
    model_version: str = ""


@dataclass
class InferenceFailure:
    """An input that produced no prediction, and why."""

    image_path: str
    error: str
    error_type: str
    timestamp: str = field(default_factory=lambda: datetime.now().astimezone().isoformat())


def normalized_entropy(probs: list[float] | torch.Tensor) -> float:
    """Shannon entropy of ``probs`` divided by ln(K): 0 for certainty, 1 for a uniform guess."""
    p = torch.as_tensor(probs, dtype=torch.float64)
    entropy = -torch.special.xlogy(p, p).sum()
    return float(entropy / math.log(len(p)))


def risk_level(confidence: float, uncertainty: float) -> str:
    """The seed's rule: LOW if confidence > 0.8 and uncertainty < 0.3; MEDIUM if > 0.6 and < 0.5; else HIGH."""
    if confidence > 0.8 and uncertainty < 0.3:
        return RISK_LOW
    if confidence > 0.6 and uncertainty < 0.5:
        return RISK_MEDIUM
    return RISK_HIGH


def list_inputs(directory: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Image files in ``directory`` (recursive by default, hidden files and __MACOSX skipped)."""
    base = Path(directory)
    if not base.is_dir():
        raise DataError(f"image_dir {str(base)!r} does not exist or is not a folder")
    pattern = base.rglob("*") if recursive else base.glob("*")
    files = sorted(p for p in pattern if p.is_file() and is_image_file(p)
                   and not any(part.startswith(".") or part.lower() == "__macosx"
                               for part in p.relative_to(base).parts[:-1]))
    return files


class MedicalImageInference:
    """A loaded model that predicts on images.

    Args:
        model_path: a checkpoint written by ``pneumoscan train``; None uses the shipped model.
        device: ``auto``, ``cpu`` or ``cuda``.
        threshold: overrides the checkpoint's operating threshold on P(PNEUMONIA).
        batch_size: images per forward pass in folder prediction.

    Raises:
        CheckpointError: the checkpoint is missing or not a usable pneumoscan checkpoint.
    """

    def __init__(self, model_path: str | os.PathLike | None = None, device: str = "auto",
                 threshold: float | None = None, batch_size: int = 16) -> None:
        if model_path is None:
            model_path = default_model_path()
        self.model_path = str(model_path)
        self.checkpoint = load_checkpoint(model_path)
        self.device = resolve_device(device)
        self.model = model_from_checkpoint(self.checkpoint).to(self.device)
        self.model = self.model.to(memory_format=torch.channels_last)
        self.class_names = list(self.checkpoint["class_names"])
        self.image_size = int(self.checkpoint["image_size"])
        self.temperature = self.checkpoint.get("temperature")
        if threshold is not None and not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
        self.threshold = float(self.checkpoint.get("threshold", 0.5) if threshold is None else threshold)
        self.batch_size = batch_size
        self.model_version = self.checkpoint.get("model_version") or Path(model_path).stem
        if self.temperature is None:
            log.warning("%s has no calibration: probabilities are uncalibrated softmax outputs", model_path)

    @property
    def info(self) -> dict:
        """What produced the predictions, for result files and audit logs."""
        return {"model_path": self.model_path, "model_version": self.model_version,
                "arch": self.checkpoint.get("arch"), "image_size": self.image_size,
                "threshold": self.threshold, "temperature": self.temperature,
                "calibrated": self.temperature is not None, "class_names": self.class_names}

    def _result(self, logits: torch.Tensor, seconds: float, path: str | None) -> InferenceResult:
        probs = torch.softmax(logits.double() / (self.temperature or 1.0), dim=-1)
        p_pos = float(probs[1])
        label = 1 if p_pos >= self.threshold else 0
        confidence = float(probs[label])
        uncertainty = normalized_entropy(probs)
        return InferenceResult(
            prediction=self.class_names[label],
            confidence=confidence,
            probabilities={name: float(probs[i]) for i, name in enumerate(self.class_names)},
            risk_level=risk_level(confidence, uncertainty),
            uncertainty=uncertainty,
            processing_time=seconds,
            timestamp=datetime.now().astimezone().isoformat(),
            image_path=path,
            threshold=self.threshold,
            calibrated=self.temperature is not None,
            model_version=self.model_version,
        )

    def _forward(self, arrays: list) -> torch.Tensor:
        images = torch.from_numpy(np.stack(arrays))
        return predict_logits(self.model, images, self.checkpoint["normalization"],
                              self.checkpoint["in_channels"], self.device, batch_size=len(arrays))

    def predict_image(self, source: str | os.PathLike | bytes) -> InferenceResult:
        """Predict one image (path or encoded bytes).

        Raises:
            ImageError: the input cannot be read or decoded.
        """
        t0 = time.perf_counter()
        arr = load_image(source, self.image_size)
        logits = self._forward([arr])[0]
        path = None if isinstance(source, bytes) else str(source)
        return self._result(logits, time.perf_counter() - t0, path)

    def predict_batch(self, paths: list[str | os.PathLike]) -> list[InferenceResult | InferenceFailure]:
        """Predict many files, in order; a file that fails becomes an ``InferenceFailure``."""
        out: list[InferenceResult | InferenceFailure | None] = [None] * len(paths)
        pending: list[tuple[int, object, float]] = []

        def flush() -> None:
            if not pending:
                return
            t0 = time.perf_counter()
            logits = self._forward([a for _, a, _ in pending])
            share = (time.perf_counter() - t0) / len(pending)
            for (i, _, decode_s), lg in zip(pending, logits):
                out[i] = self._result(lg, decode_s + share, str(paths[i]))
            pending.clear()

        for i, path in enumerate(paths):
            t0 = time.perf_counter()
            try:
                arr = load_image(path, self.image_size)
            except ImageError as exc:
                out[i] = InferenceFailure(str(path), str(exc), type(exc).__name__)
                log.warning("%s", exc)
                continue
            pending.append((i, arr, time.perf_counter() - t0))
            if len(pending) >= self.batch_size:
                flush()
        flush()
        return out

    def predict_directory(self, directory: str | os.PathLike, recursive: bool = True
                          ) -> list[InferenceResult | InferenceFailure]:
        """Predict every image file under ``directory``.

        Raises:
            DataError: the folder does not exist or holds no image files.
        """
        files = list_inputs(directory, recursive)
        if not files:
            raise DataError(f"no .jpg, .jpeg or .png files found in {directory}")
        log.info("predicting %d file(s) from %s", len(files), directory)
        return self.predict_batch(files)
