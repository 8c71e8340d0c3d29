"""model.py: output shapes, the seed's parameter count, gradients, Xavier init, build_model."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pneumoscan.config import TrainConfig
from pneumoscan.model import ARCHITECTURES, SEED_WIDTHS, MedicalCNN, build_model, model_kwargs

SEED_PARAMETERS = 4_848_034  # the seed MedicalCNN with 3 input channels


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("in_channels", [1, 3])
def test_output_shape_for_every_arch_and_channel_count(arch, in_channels):
    torch.manual_seed(0)
    cfg = SimpleNamespace(arch=arch, in_channels=in_channels, width=0.25, dropout=0.5)
    model = build_model(cfg).eval()
    x = torch.randn(3, in_channels, 64, 64)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (3, 2)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_full_width_model_accepts_224px_input():
    model = MedicalCNN(in_channels=3).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 2)


def test_seed_parameter_count():
    assert n_params(MedicalCNN(in_channels=3)) == SEED_PARAMETERS
    # One input channel removes exactly the first conv's weights for two channels.
    first = MedicalCNN(in_channels=3).features[0].conv1
    per_channel = first.out_channels * first.kernel_size[0] * first.kernel_size[1]
    assert n_params(MedicalCNN(in_channels=1)) == SEED_PARAMETERS - 2 * per_channel


def test_seed_architecture_layout():
    model = MedicalCNN()
    assert [b.conv1.out_channels for b in model.features] == list(SEED_WIDTHS)
    assert all(b.se is None and b.shortcut is None for b in model.features)
    assert (model.fc1.in_features, model.fc1.out_features) == (512, 256)
    assert (model.fc2.in_features, model.fc2.out_features) == (256, 2)
    assert model.dropout.p == 0.5


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_parameter_gets_a_gradient(arch):
    torch.manual_seed(1)
    model = build_model(SimpleNamespace(arch=arch, in_channels=3, width=0.5, dropout=0.5)).train()
    x = torch.randn(4, 3, 64, 64)
    y = torch.tensor([0, 1, 0, 1])
    loss = nn.functional.cross_entropy(model(x), y)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_no_nan_on_extreme_inputs():
    model = MedicalCNN(in_channels=1, widths=(8, 8, 8, 8, 8)).eval()
    with torch.no_grad():
        for x in (torch.zeros(2, 1, 64, 64), torch.full((2, 1, 64, 64), 1e3), torch.full((2, 1, 64, 64), -1e3)):
            assert torch.isfinite(model(x)).all()


def test_xavier_uniform_initialisation():
    torch.manual_seed(2)
    model = MedicalCNN(in_channels=3)
    checked = 0
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w = m.weight.detach()
            fan_in = w.shape[1] * w[0, 0].numel()
            fan_out = w.shape[0] * w[0, 0].numel()
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            assert w.abs().max() <= bound + 1e-7, f"{name}: weight outside the Xavier bound"
            if w.numel() >= 10_000:  # enough samples for a tight std estimate
                assert float(w.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05), name
                checked += 1
            if m.bias is not None:
                assert torch.count_nonzero(m.bias) == 0, f"{name}: bias not zero-initialised"
        elif isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name
    assert checked >= 8


def test_build_model_honours_config():
    cfg = TrainConfig(arch="medical_cnn_res_se", in_channels=1, width=0.5, dropout=0.25)
    model = build_model(cfg)
    expected_widths = [max(8, round(w * 0.5)) for w in SEED_WIDTHS]
    assert [b.conv1.out_channels for b in model.features] == expected_widths
    assert model.features[0].conv1.in_channels == 1
    assert all(b.se is not None and b.shortcut is not None for b in model.features)
    assert model.dropout.p == 0.25
    assert model.fc1.in_features == expected_widths[-1]

    res = build_model(TrainConfig(arch="medical_cnn_res"))
    assert all(b.shortcut is not None and b.se is None for b in res.features)
    se = build_model(TrainConfig(arch="medical_cnn_se"))
    assert all(b.se is not None and b.shortcut is None for b in se.features)
    assert n_params(build_model(TrainConfig())) == SEED_PARAMETERS


def test_unknown_arch_names_the_valid_choices():
    with pytest.raises(ValueError) as info:
        model_kwargs("resnet50", 3)
    message = str(info.value)
    assert "resnet50" in message
    for arch in ARCHITECTURES:
        assert arch in message
    with pytest.raises(ValueError, match="medical_cnn_res_se"):
        build_model(SimpleNamespace(arch="vit", in_channels=3, width=1.0, dropout=0.5))


def test_bad_channel_count_is_refused():
    with pytest.raises(ValueError, match="in_channels"):
        MedicalCNN(in_channels=2)
