"""One training step, the same for the training loop (``train.train_one_epoch``) and the speed check
that times it before a run (``budget.probe_epoch_minutes``).

``training_batch`` turns a batch of cached uint8 films into model input (augmentation, the input
contract's transform, mixup); ``train_step`` runs the forward pass, the loss, backward and the
optimiser step on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .augment import augment_batch, mixup
from .config import TrainConfig
from .errors import TrainingError
from .predict import InputSpec


@dataclass
class TrainingBatch:
    """Model input and targets; with mixup, each film's partner target and the blend weight ``lam``."""

    x: torch.Tensor
    target: torch.Tensor
    partner: torch.Tensor | None = None
    lam: float = 1.0


def sync(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that a clock reading after it measures that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_batch(images: torch.Tensor, target: torch.Tensor, spec: InputSpec, cfg: TrainConfig,
                   gen: torch.Generator, mix_rng: np.random.Generator) -> TrainingBatch:
    """``images`` ((N, H, W) uint8 on the training device) augmented with ``gen``'s draws as
    ``cfg.augment`` says, transformed by ``spec``, and mixed up with ``mix_rng``'s draws when
    ``cfg.mixup`` > 0."""
    x = spec.to_tensor(augment_batch(images.float().div_(255.0).unsqueeze(1), cfg.augment, gen))
    if cfg.mixup > 0:
        x, partner, lam = mixup(x, target, cfg.mixup, mix_rng)
        return TrainingBatch(x, target, partner, lam)
    return TrainingBatch(x, target)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, criterion: torch.nn.Module,
               batch: TrainingBatch, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on ``batch`` (bf16 autocast on a GPU); returns the loss and the logits.

    Raises:
        TrainingError: (a FloatingPointError) the loss is not finite (checked before the weights change); ``where``
            says which batch it was.
    """
    device_type = batch.x.device.type
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type == "cuda"):
        logits = model(batch.x)
    loss = criterion(logits.float(), batch.target)
    if batch.partner is not None:
        loss = batch.lam * loss + (1.0 - batch.lam) * criterion(logits.float(), batch.partner)
    if not torch.isfinite(loss):
        raise TrainingError(f"training loss became {loss.item()} at {where}; lower --lr")
    loss.backward()
    optimizer.step()
    return loss, logits
