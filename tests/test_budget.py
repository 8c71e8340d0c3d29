"""budget.py: how many epochs fit in --max_train_minutes, and the fast preset's fallback to a narrower model."""

from __future__ import annotations

import math

import pytest
import torch

from pneumoscan import budget
from pneumoscan.budget import choose_width, epoch_minutes, last_epoch_in_budget, probe_epoch_minutes
from pneumoscan.config import TrainConfig
from pneumoscan.distributed import World

CPU = torch.device("cpu")
# a small configuration, so that the probe's few real training steps take well under a second
SMALL = {"image_size": 64, "batch_size": 8, "augment": "acquisition", "device": "cpu"}


def test_last_epoch_in_budget_counts_the_epochs_that_still_fit():
    assert last_epoch_in_budget(0, 0.0, 1.3, 8.0) == 6  # 6 x 1.3 = 7.8 fits, a 7th does not
    assert last_epoch_in_budget(0, 0.0, 2.9, 8.0) == 2
    assert last_epoch_in_budget(0, 0.0, 0.0, 8.0) > 10 ** 6  # nothing measurable: everything fits


@pytest.mark.parametrize("flags", [{}, {"mixup": 0.2, "loss": "weighted_ce"}])
def test_the_probe_times_the_training_loops_own_steps_and_draws_nothing_from_torchs_random_state(
        flags, monkeypatch):
    seen, real = [], budget.train_step

    def spy(model, optimizer, criterion, batch, where):
        seen.append((batch.partner is not None, type(criterion).__name__))
        return real(model, optimizer, criterion, batch, where)

    cfg = TrainConfig(width=0.5, **SMALL, **flags)
    monkeypatch.setattr(budget, "train_step", spy)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    one = probe_epoch_minutes(cfg, 80, 40, CPU, steps=2)
    assert torch.equal(torch.get_rng_state(), before)
    assert math.isfinite(one) and one > 0
    loss = {"focal": "FocalLoss", "weighted_ce": "CrossEntropyLoss"}[cfg.loss]
    assert seen == [(cfg.mixup > 0, loss)] * 3  # a warm-up step and 2 timed ones, mixed up as the run would be


def test_an_epoch_is_its_batches_steps_plus_its_validation_images():
    # 4410 films in batches of 32: 138 steps (the last one short) of 1.2 s, and 780 films validated at 10 ms
    assert epoch_minutes(4410, 780, 32, 1.2, 0.01) == pytest.approx((138 * 1.2 + 7.8) / 60)
    assert epoch_minutes(64, 0, 32, 3.0, 1.0) == pytest.approx(0.1)


def test_choose_width_falls_back_only_where_the_epochs_do_not_fit(caplog):
    roomy = TrainConfig(width=0.5, fallback_width=0.25, max_train_minutes=600.0, epochs=2, **SMALL)
    cfg, info = choose_width(roomy, 64, 32, CPU, World(), resumed_width=None)
    assert cfg == roomy and info["width"] == 0.5 and info["epochs_that_fit"] == 2
    tight = TrainConfig(width=0.5, fallback_width=0.25, max_train_minutes=1e-6, epochs=6, **SMALL)
    with caplog.at_level("WARNING", logger="pneumoscan.budget"):
        cfg, info = choose_width(tight, 64, 32, CPU, World(), resumed_width=None)
    assert cfg.width == 0.25 and cfg.fallback_width == 0.25 and info["width_checked"] == 0.5
    assert info["epochs_that_fit"] == 0 and info["epoch_minutes_estimated"] > 0
    assert "training at width 0.25 instead" in caplog.text and "--fallback_width 0" in caplog.text
    assert info["check_s"] > 0 and "10% margin" in caplog.text


@pytest.mark.parametrize("flags", [{"fallback_width": 0.0}, {"max_train_minutes": 0.0},
                                   {"init_from": "shipped"}, {"fallback_width": 0.5}])
def test_no_speed_check_without_a_fallback_a_budget_or_fresh_weights(flags):
    cfg = TrainConfig(**{"width": 0.5, "fallback_width": 0.25, "max_train_minutes": 1e-6, **SMALL, **flags})
    assert choose_width(cfg, 64, 32, CPU, World(), resumed_width=None) == (cfg, None)
