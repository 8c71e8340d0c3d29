"""Fitting a training run into ``--max_train_minutes``.

``last_epoch_in_budget`` says where a run will stop (the training loop ends its cosine schedule
there and stops by it). ``choose_width`` lets a preset fall back to a narrower model
(``TrainConfig.fallback_width``) on a machine too slow for its epochs to fit: it times a few
training steps of a throwaway model before training starts, so that the run that follows is the
same, draw for draw, as one without the check.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time

import numpy as np
import torch

from .config import TrainConfig
from .distributed import World, from_main
from .losses import build_loss
from .model import build_model
from .predict import InputSpec
from .step import sync, train_step, training_batch

log = logging.getLogger(__name__)

# The probe leaves out what an epoch also does (batch indexing, the progress bar, two checkpoint
# writes), and its few steps are noisy: an epoch is taken to cost this much more than the probe says.
PROBE_MARGIN = 1.1


def last_epoch_in_budget(epoch: int, elapsed_min: float, per_epoch_min: float, budget_min: float) -> int:
    """The last epoch that ends within ``budget_min`` minutes, ``epoch`` having ended at ``elapsed_min``
    and epochs taking ``per_epoch_min`` each; ``epoch`` itself when no other fits, which is when ``fit``
    stops for time. Epochs that took no measurable time all fit."""
    if per_epoch_min <= 0:
        return sys.maxsize
    return epoch + max(0, math.floor((budget_min - elapsed_min) / per_epoch_min))


def epoch_minutes(n_train: int, n_val: int, batch_size: int, step_s: float, val_image_s: float) -> float:
    """Minutes of one epoch: ``ceil(n_train / batch_size)`` training steps of ``step_s`` seconds, then
    ``n_val`` validation images of ``val_image_s`` seconds each."""
    return (math.ceil(n_train / batch_size) * step_s + n_val * val_image_s) / 60


def probe_epoch_minutes(cfg: TrainConfig, n_train: int, n_val: int, device: torch.device, steps: int = 3) -> float:
    """Minutes one epoch of ``cfg`` (``n_train`` training images, ``n_val`` validated) would take here.

    Times ``steps`` training steps of a freshly built model on random images after one warm-up step
    (the training loop's own ``training_batch`` and ``train_step``: augmentation, input transform,
    mixup, forward, the run's kind of loss, backward, Adam), and one validation forward of
    ``2 * batch_size`` images after a warm-up forward. torch's random state is restored afterwards:
    the probe draws nothing that the training run would have drawn.
    """
    bs, size = cfg.batch_size, cfg.image_size
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        model = build_model(cfg).to(device).to(memory_format=torch.channels_last).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        criterion = build_loss(cfg.loss, [1, 1], cfg.focal_gamma).to(device)
        spec = InputSpec(size, 0.5, 0.25, cfg.in_channels, intensity=cfg.intensity)
        gen = torch.Generator(device=device).manual_seed(0)
        mix_rng = np.random.default_rng(0)
        images = torch.randint(0, 256, (bs, size, size), dtype=torch.uint8).to(device)
        target = torch.arange(bs, device=device) % 2

        def step() -> None:
            train_step(model, optimizer, criterion, training_batch(images, target, spec, cfg, gen, mix_rng),
                       "the speed check")

        step()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        per_step = (time.perf_counter() - t0) / steps
        model.eval()
        val_images = images.repeat(2, 1, 1)
        with torch.inference_mode():
            model(spec.to_tensor(val_images[:2]))
            sync(device)
            t0 = time.perf_counter()
            model(spec.to_tensor(val_images))
            sync(device)
        per_val_image = (time.perf_counter() - t0) / len(val_images)
    return epoch_minutes(n_train, n_val, bs, per_step, per_val_image)


def choose_width(cfg: TrainConfig, n_train: int, n_val: int, device: torch.device, world: World, *,
                 resumed_width: float | None) -> tuple[TrainConfig, dict | None]:
    """``cfg`` at ``cfg.fallback_width`` if its ``--epochs`` at ``cfg.width`` would not fit in
    ``--max_train_minutes`` here, else ``cfg``; and what was measured (None when no check applies).

    The check applies only with a fallback width, a time budget and fresh weights (``--init_from``
    fixes the width). A ``--resume`` keeps ``resumed_width``, the width in the ``checkpoint_last.pth``
    of the run it continues (every rank is given it). Under torchrun rank 0 measures (its share of the
    training split) and every rank follows it; rank 0 times alone, without gradient all-reduce, so
    where several ranks share the CPU cores the estimate is too low.
    """
    if not (cfg.fallback_width and cfg.max_train_minutes) or cfg.fallback_width == cfg.width or cfg.init_from:
        return cfg, None
    if cfg.resume:
        if resumed_width != cfg.fallback_width:  # the same width, or another one that --resume will refuse
            return cfg, None
        log.info("--resume: continuing at width %s, the width in checkpoint_last.pth (not %s)", resumed_width,
                 cfg.width)
        return (dataclasses.replace(cfg, width=resumed_width),
                {"width_checked": cfg.width, "width": resumed_width, "resumed": True})
    per_rank = math.ceil(n_train / world.world_size)
    t0 = time.perf_counter()
    minutes = from_main(lambda: probe_epoch_minutes(cfg, per_rank, n_val, device), world)
    fit = last_epoch_in_budget(0, 0.0, PROBE_MARGIN * minutes, cfg.max_train_minutes)
    info = {"width_checked": cfg.width, "epoch_minutes_estimated": minutes, "probe_margin": PROBE_MARGIN,
            "epochs_that_fit": min(fit, cfg.epochs), "check_s": time.perf_counter() - t0}
    said = (f"speed check ({info['check_s']:.0f} s): an epoch at width {cfg.width} would take about "
            f"{PROBE_MARGIN * minutes:.1f} min here (timed steps plus a {PROBE_MARGIN - 1:.0%} margin)")
    if fit >= cfg.epochs:
        log.info("%s; %d epochs fit in --max_train_minutes %s", said, cfg.epochs, cfg.max_train_minutes)
        return cfg, {**info, "width": cfg.width}
    log.warning("%s, so only %d of %d epochs fit in --max_train_minutes %s; training at width %s instead "
                "(--width to insist on a width, --fallback_width 0 to turn this off)", said, fit, cfg.epochs,
                cfg.max_train_minutes, cfg.fallback_width)
    return dataclasses.replace(cfg, width=cfg.fallback_width), {**info, "width": cfg.fallback_width}
