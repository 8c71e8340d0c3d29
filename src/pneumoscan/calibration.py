"""Temperature scaling (Guo et al. 2017) and the operating threshold."""

from __future__ import annotations

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


def calibrated_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Class probabilities ``softmax(logits / temperature)``."""
    return torch.softmax(logits.float() / temperature, dim=-1)
