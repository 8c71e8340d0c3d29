"""Temperature scaling (Guo et al. 2017), logistic calibration with an intercept (Platt 1999; for
``pneumoscan calibrate --intercept``), and the operating threshold.

P(PNEUMONIA) = sigmoid((z1 - z0) / T + b): b is 0 for temperature scaling. A model trained with a loss weighted
towards one class leaves its logits offset, which T cannot move and b can; but the fitted curve is steeper, so
where films differ from the ones it was fitted on its errors become confident ones (docs/experiments.md,
"Calibration with an intercept"): the shipped model keeps b = 0, and a site fits b on its own films.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F

from .errors import TrainingError

log = logging.getLogger(__name__)

TEMPERATURE_BOUNDS = (0.05, 20.0)
# LBFGS's defaults stop while the loss still moves by 1e-9, which left the temperature 2e-4 (relative) from the
# optimum scikit-learn finds; a one- or two-parameter fit reaches it in a few more steps
_TOLERANCES = {"tolerance_grad": 1e-12, "tolerance_change": 1e-15}


def _finite_logits(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` as float64, refused if any is NaN or infinite: the fit would return a NaN temperature, which
    every probability after it would inherit.

    Raises:
        ValueError: a logit is not finite.
    """
    z = logits.detach().double()
    bad = int((~torch.isfinite(z)).any(dim=1).sum())
    if bad:
        raise ValueError(f"{bad} of {len(z)} films have NaN or infinite logits (a faulty model or backend): no "
                         f"calibration can be fitted on them")
    return z


def _within_bounds(t: float, what: str) -> tuple[float, bool]:
    """The fitted temperature ``t`` clamped to ``TEMPERATURE_BOUNDS``, and whether it had to be, with a warning
    that says what a temperature at a bound means (it is no optimum of the films' likelihood).

    Raises:
        TrainingError: the fit diverged (``t`` is not finite).
    """
    if not math.isfinite(t):
        raise TrainingError(f"the {what} fit diverged (temperature {t}); the logits it was given are unusable")
    lo, hi = TEMPERATURE_BOUNDS
    if lo <= t <= hi:
        return t, False
    bound = lo if t < lo else hi
    why = ("the model all but separates these films, so the likelihood has no finite optimum and the calibrated "
           "probabilities are all close to 0 or 1" if t < lo else
           "the logits carry almost no information about these films' labels (or rank them the wrong way round), "
           "so the calibrated probabilities hardly differ from film to film")
    log.warning("%s: the fitted temperature %.4g is outside [%g, %g] and was set to %g: %s; fit it on more, or "
                "other, films", what, t, lo, hi, bound, why)
    return bound, True


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> float:
    """The temperature T > 0 that minimises the NLL of ``softmax(logits / T)`` on held-out data, within
    ``TEMPERATURE_BOUNDS`` (a warning says when it had to be clamped there).

    Raises:
        ValueError: a logit is NaN or infinite.
        TrainingError: the fit diverged.
    """
    logits = _finite_logits(logits)
    labels = labels.detach().long()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe", **_TOLERANCES)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return _within_bounds(float(log_t.detach().exp()), "temperature scaling")[0]


def calibrated_probs(logits: torch.Tensor, temperature: float | None = None, bias: float = 0.0) -> torch.Tensor:
    """Class probabilities ``softmax(logits / temperature + [0, bias])`` in float64 (None: no calibration,
    T = 1; ``bias`` 0: temperature scaling alone).

    The one place a calibration is applied: training's threshold choice, evaluation and every
    prediction read their probabilities from here, so they agree to the last digit.
    """
    scaled = logits.double() / (temperature or 1.0)
    if bias:
        scaled = scaled + torch.tensor([0.0, float(bias)], dtype=torch.float64)
    return torch.softmax(scaled, dim=-1)


def temperature_text(temperature: float | None, digits: int = 3) -> str:
    """A stored temperature as reports print it: None (the model left uncalibrated) said in words."""
    return "none (uncalibrated)" if temperature is None else f"{temperature:.{digits}f}"


def positive_probability(logits: torch.Tensor, temperature: float | None = None, bias: float = 0.0) -> np.ndarray:
    """P(PNEUMONIA), class 1, as a float64 numpy array (calibrated when a temperature is given)."""
    return calibrated_probs(logits, temperature, bias)[:, 1].numpy()


def fit_logistic(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> tuple[float, float]:
    """The (temperature T, bias b) of least NLL on held-out data for P(PNEUMONIA) = sigmoid((z1 - z0) / T + b).
    T is kept within ``TEMPERATURE_BOUNDS`` (with a warning); where it had to be clamped, b is fitted again for
    that T, so that the pair is the best one with it.

    Raises:
        ValueError: a logit is NaN or infinite.
        TrainingError: the fit diverged.
    """
    logits = _finite_logits(logits)
    z = logits[:, 1] - logits[:, 0]
    y = labels.detach().double()
    log_a = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)

    def fit(params: list[torch.Tensor], slope) -> None:
        opt = torch.optim.LBFGS(params, lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe",
                                **_TOLERANCES)

        def closure():
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(z * slope() + b, y)
            loss.backward()
            return loss

        opt.step(closure)

    fit([log_a, b], log_a.exp)
    t, clamped = _within_bounds(float(1.0 / log_a.detach().exp()), "logistic calibration")
    if clamped:
        fit([b], lambda: 1.0 / t)
    bias = float(b.detach())
    if not math.isfinite(bias):
        raise TrainingError(f"the logistic calibration fit diverged (bias {bias}); the logits it was given are "
                            f"unusable")
    return t, bias


def fit_operating_point(logits: torch.Tensor, labels: torch.Tensor, target_sensitivity: float) -> tuple[float, float]:
    """The temperature fitted on these films, and the threshold on their calibrated P(PNEUMONIA) that keeps
    sensitivity >= ``target_sensitivity`` (``metrics.threshold_for_sensitivity``): an operating point."""
    t, thr, _ = fit_calibrated_point(logits, labels, target_sensitivity)
    return t, thr


def separable(logits: torch.Tensor, labels: torch.Tensor, intercept: bool = False) -> bool:
    """Whether no film is on the wrong side of the margin z1 - z0 = 0 (with ``intercept``: of some margin).
    Then the likelihood has no finite optimum: the fitted temperature runs to its lower bound (0.05) and
    turns every probability into 0 or 1, so there is nothing to calibrate from these films."""
    z = (logits[:, 1] - logits[:, 0]).detach().double()
    pos, neg = z[labels == 1], z[labels == 0]
    if not len(pos) or not len(neg):
        return True
    return bool(neg.max() < pos.min()) if intercept else bool((pos > 0).all() and (neg < 0).all())


def fit_calibrated_point(logits: torch.Tensor, labels: torch.Tensor, target_sensitivity: float,
                         intercept: bool = False,
                         if_separable: tuple[float, float] | None = None) -> tuple[float, float, float]:
    """(temperature, threshold, bias): ``fit_operating_point``, with ``intercept`` by logistic calibration
    (``fit_logistic``) instead of a temperature alone (then bias 0). With ``if_separable`` (a temperature and
    bias, e.g. the model's stored ones), films that are ``separable`` keep those and only the threshold is fitted."""
    from .metrics import threshold_for_sensitivity

    if if_separable is not None and separable(logits, labels, intercept):
        t, b = if_separable
    else:
        t, b = fit_logistic(logits, labels) if intercept else (fit_temperature(logits, labels), 0.0)
    return t, threshold_for_sensitivity(labels.numpy(), positive_probability(logits, t, b), target_sensitivity), b


def cross_fitted_ece(logits: torch.Tensor, labels: torch.Tensor, groups: list[str], n_bins: int = 15,
                     seed: int = 0) -> float:
    """ECE of temperature scaling measured honestly: fit on half the patients, measure on the other.

    Two folds by patient; returns the count-weighted ECE over both held-out halves. A half whose films are
    ``separable`` fits no temperature, as training then ships none: the ECE measured is the one shipped.
    """
    from .metrics import expected_calibration_error

    rng = torch.Generator().manual_seed(seed)
    patients = sorted(set(groups))
    order = torch.randperm(len(patients), generator=rng).tolist()
    fold_of = {patients[i]: k % 2 for k, i in enumerate(order)}
    fold = torch.tensor([fold_of[g] for g in groups])
    total, n = 0.0, 0
    for k in (0, 1):
        fit, held = fold != k, fold == k
        if held.sum() == 0 or len(set(labels[fit].tolist())) < 2:
            continue
        t = None if separable(logits[fit], labels[fit]) else fit_temperature(logits[fit], labels[fit])
        prob = positive_probability(logits[held], t)
        total += expected_calibration_error(labels[held].numpy(), prob, n_bins) * int(held.sum())
        n += int(held.sum())
    return total / n if n else float("nan")
