"""Measuring a model on labelled images: clinical metrics with patient-level CIs, and calibration."""

from __future__ import annotations

import logging

import numpy as np

from .data import ImageSet
from .metrics import expected_calibration_error, metrics_with_ci
from .predict import Predictor

log = logging.getLogger(__name__)


def evaluate_imageset(predictor: Predictor, data: ImageSet, threshold: float,
                      n_boot: int = 1000, prevalence: float | None = None) -> tuple[dict, np.ndarray]:
    """Metrics with patient-level bootstrap CIs and calibration of ``predictor`` on ``data``, and P(PNEUMONIA).

    Probabilities are calibrated with the predictor's temperature when it has one. With ``prevalence``,
    PPV and NPV are also given where pneumonia has that prevalence (``metrics.binary_metrics``).
    """
    prob = predictor.probabilities(predictor.logits(data.images))[:, 1].numpy()
    y = data.labels.numpy()
    report = metrics_with_ci(y, prob, threshold, n_boot=n_boot, groups=data.patients, prevalence=prevalence)
    report["temperature"] = predictor.temperature or 1.0
    report["calibration_bias"] = predictor.bias
    report["calibrated"] = predictor.temperature is not None
    report["ece_15"] = expected_calibration_error(y, prob)
    report["class_counts"] = data.class_counts()
    report["patients"] = len(set(data.patients))  # the groups the CIs resample
    return report, prob
