"""step.py: the training step that the training loop and the speed check share."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pneumoscan.config import TrainConfig
from pneumoscan.losses import build_loss
from pneumoscan.model import build_model
from pneumoscan.predict import InputSpec
from pneumoscan.step import TrainingBatch, train_step, training_batch

CFG = TrainConfig(width=0.25, image_size=32, augment="acquisition", device="cpu")
SPEC = InputSpec(32, 0.5, 0.25, CFG.in_channels)


def _batch(cfg: TrainConfig, seed: int = 0):
    images = torch.randint(0, 256, (6, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 1, 0, 1, 1, 0])
    return training_batch(images, target, SPEC, cfg, torch.Generator().manual_seed(seed),
                          np.random.default_rng(seed))


def test_a_batch_is_augmented_by_its_generator_and_mixed_up_only_with_mixup():
    plain = _batch(CFG)
    assert plain.partner is None and plain.lam == 1.0 and plain.x.shape == (6, CFG.in_channels, 32, 32)
    assert torch.equal(plain.x, _batch(CFG).x) and not torch.equal(plain.x, _batch(CFG, seed=1).x)
    mixed = _batch(TrainConfig(**{**CFG.to_dict(), "mixup": 0.4}))
    assert mixed.partner is not None and 0.5 <= mixed.lam < 1.0
    assert sorted(mixed.partner.tolist()) == sorted(mixed.target.tolist())  # a permutation of the targets


def test_a_step_changes_the_weights_and_a_non_finite_loss_stops_before_it_does():
    torch.manual_seed(0)
    model = build_model(CFG).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = build_loss("weighted_ce", [1, 1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, logits = train_step(model, optimizer, criterion, _batch(CFG), "epoch 1, batch 0")
    assert torch.isfinite(loss) and logits.shape == (6, 2)
    assert not torch.equal(before["features.0.conv1.weight"], model.state_dict()["features.0.conv1.weight"])
    after = {k: v.clone() for k, v in model.state_dict().items()}
    bad = _batch(CFG)
    bad.x[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="at epoch 3, batch 7; lower --lr"):
        train_step(model, optimizer, criterion, bad, "epoch 3, batch 7")
    assert all(torch.equal(after[k], v) for k, v in model.state_dict().items()
               if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))


def test_with_mixup_the_loss_is_the_blend_of_both_targets_losses():
    torch.manual_seed(0)
    model = build_model(CFG).eval()  # eval: the forward pass below sees the same network
    optimizer = torch.optim.Adam(model.parameters(), lr=0.0)  # lr 0: the step leaves the weights as they are
    criterion = build_loss("weighted_ce", [1, 3])
    plain = _batch(CFG)
    mixed = TrainingBatch(plain.x, plain.target, 1 - plain.target, 0.7)  # every partner of the other class
    loss, _ = train_step(model, optimizer, criterion, mixed, "epoch 1, batch 0")
    with torch.no_grad():
        logits = model(mixed.x)
        own, other = criterion(logits, mixed.target).item(), criterion(logits, mixed.partner).item()
    assert loss.item() == pytest.approx(0.7 * own + 0.3 * other, rel=1e-5)
    assert own != pytest.approx(other, rel=1e-4)  # so that the blend differs from either loss alone


@pytest.mark.parametrize(("n", "batch_size"), [(10, 4), (9, 4), (8, 4), (5, 4), (33, 32), (2, 32), (4410, 32)])
def test_every_film_is_in_one_batch_and_no_batch_holds_one(n, batch_size):
    from pneumoscan.train import batch_bounds

    bounds = batch_bounds(n, batch_size)
    assert [i for a, b in bounds for i in range(a, b)] == list(range(n))
    assert all(2 <= b - a <= batch_size + 1 for a, b in bounds)
