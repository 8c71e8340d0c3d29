"""Temperature scaling (Guo et al. 2017) and the operating threshold."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> float:
    """The temperature T > 0 that minimises the NLL of ``softmax(logits / T)`` on held-out data."""
    logits = logits.detach().double()
    labels = labels.detach().long()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    return min(max(t, 0.05), 20.0)


def calibrated_probs(logits: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
    """Class probabilities ``softmax(logits / temperature)`` in float64 (None: no calibration, T = 1).

    The one place a temperature is applied: training's threshold choice, evaluation and every
    prediction read their probabilities from here, so they agree to the last digit.
    """
    return torch.softmax(logits.double() / (temperature or 1.0), dim=-1)


def positive_probability(logits: torch.Tensor, temperature: float | None = None) -> np.ndarray:
    """P(PNEUMONIA), class 1, as a float64 numpy array (calibrated when a temperature is given)."""
    return calibrated_probs(logits, temperature)[:, 1].numpy()


def fit_operating_point(logits: torch.Tensor, labels: torch.Tensor, target_sensitivity: float) -> tuple[float, float]:
    """The temperature fitted on these films, and the threshold on their calibrated P(PNEUMONIA) that keeps
    sensitivity >= ``target_sensitivity`` (``metrics.threshold_for_sensitivity``): an operating point."""
    from .metrics import threshold_for_sensitivity

    t = fit_temperature(logits, labels)
    return t, threshold_for_sensitivity(labels.numpy(), positive_probability(logits, t), target_sensitivity)


def cross_fitted_ece(logits: torch.Tensor, labels: torch.Tensor, groups: list[str], n_bins: int = 15,
                     seed: int = 0) -> float:
    """ECE of temperature scaling measured honestly: fit on half the patients, measure on the other.

    Two folds by patient; returns the count-weighted ECE over both held-out halves.
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
        t = fit_temperature(logits[fit], labels[fit])
        prob = positive_probability(logits[held], t)
        total += expected_calibration_error(labels[held].numpy(), prob, n_bins) * int(held.sum())
        n += int(held.sum())
    return total / n if n else float("nan")
