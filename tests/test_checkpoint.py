"""checkpoint.py: save/load round trip, bare state dicts, and refusal of anything else."""

from __future__ import annotations

import pytest
import torch

from pneumoscan.checkpoint import (
    FORMAT_VERSION,
    input_spec,
    load_checkpoint,
    model_from_checkpoint,
    model_payload,
    save_checkpoint,
)
from pneumoscan.errors import CheckpointError
from pneumoscan.model import MedicalCNN, model_from_kwargs, model_kwargs
from pneumoscan.predict import CLASS_NAMES, InputSpec
from pneumoscan.preprocess import PREPROCESS_VERSION


def small_model(arch: str = "medical_cnn_se", in_channels: int = 1, width: float = 0.25):
    torch.manual_seed(3)
    kw = model_kwargs(arch, in_channels, width, dropout=0.3)
    model = model_from_kwargs(kw)
    # move the BatchNorm running statistics away from their defaults so buffers are checked too
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, in_channels, 32, 32) * 2 + 1)
    return model.eval(), kw


def payload_for(model, kw, **extra):
    args = {"arch": "medical_cnn_se", "model_kw": kw, "spec": InputSpec(64, 0.42, 0.21, kw["in_channels"]),
            "config": {"epochs": 3, "arch": "medical_cnn_se"},
            "temperature": 1.7, "threshold": 0.35, "metrics": {"val_auroc": 0.9}, "epoch": 3,
            "model_version": "unit-test"}
    args.update(extra)
    return model_payload(model, **args)


def test_round_trip_gives_identical_outputs(tmp_path):
    model, kw = small_model()
    path = tmp_path / "sub" / "model.pth"
    save_checkpoint(payload_for(model, kw), path)
    assert [p.name for p in path.parent.iterdir()] == ["model.pth"]  # no temp file left behind

    ckpt = load_checkpoint(path)
    assert ckpt["arch"] == "medical_cnn_se"
    assert input_spec(ckpt) == InputSpec(64, 0.42, 0.21, 1, PREPROCESS_VERSION)
    assert ckpt["temperature"] == 1.7 and ckpt["threshold"] == 0.35
    assert ckpt["class_names"] == list(CLASS_NAMES)
    assert ckpt["format_version"] == 2  # raw grey levels: still readable by a pneumoscan of format 2
    assert ckpt["model_version"] == "unit-test" and ckpt["epoch"] == 3


def test_an_equalizing_checkpoint_is_format_3_and_round_trips(tmp_path):
    model, kw = small_model()
    path = tmp_path / "eq.pth"
    save_checkpoint(payload_for(model, kw, spec=InputSpec(64, 0.5, 0.29, 1, intensity="equalize")), path)
    ckpt = load_checkpoint(path)
    assert ckpt["format_version"] == 3 and FORMAT_VERSION >= 3
    assert input_spec(ckpt).intensity == "equalize"

    restored = model_from_checkpoint(ckpt)
    assert not restored.training
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)
    for (name, a), (_, b) in zip(model.state_dict().items(), restored.state_dict().items()):
        assert torch.equal(a, b), name


def test_payload_copies_the_weights():
    model, kw = small_model()
    payload = payload_for(model, kw)
    before = payload["model_state"]["fc2.weight"].clone()
    with torch.no_grad():
        model.fc2.weight.add_(1.0)
    assert torch.equal(payload["model_state"]["fc2.weight"], before)


@pytest.mark.parametrize("in_channels", [3, 1])
def test_bare_state_dict_is_accepted(tmp_path, in_channels):
    torch.manual_seed(4)
    model = MedicalCNN(in_channels=in_channels).eval()
    path = tmp_path / "bare.pth"
    torch.save(model.state_dict(), path)
    ckpt = load_checkpoint(path)
    assert ckpt["arch"] == "medical_cnn" and input_spec(ckpt).in_channels == in_channels
    assert ckpt["temperature"] is None
    restored = model_from_checkpoint(ckpt)
    x = torch.randn(2, in_channels, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)


def test_whole_pickled_module_is_refused(tmp_path):
    model, _ = small_model()
    path = tmp_path / "whole_model.pth"
    torch.save(model, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "pickled" in message and "state_dict" in message


@pytest.mark.parametrize("content", [b"definitely not a checkpoint\n" * 10, bytes(range(256)), b"PK\x03\x04junk" * 8],
                         ids=["text", "binary", "broken-zip"])
def test_non_torch_file_is_refused(tmp_path, content):
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_non_torch_file_is_not_called_pickled_objects(tmp_path, real_jpeg):
    path = tmp_path / "model.pth"
    path.write_bytes(real_jpeg.read_bytes())
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "pickled" not in str(info.value)


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pth")


def test_directory_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="is a folder; pass --model_path to the .pth file in it"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("obj", [{"weights": [1, 2, 3], "name": "x"}, {"a": torch.zeros(2), "b": 3}, {}],
                         ids=["plain-dict", "mixed-dict", "empty-dict"])
def test_dict_that_is_neither_is_refused(tmp_path, obj):
    path = tmp_path / "other.pth"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="neither"):
        load_checkpoint(path)


def test_non_dict_is_refused(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="list"):
        load_checkpoint(path)


def test_incomplete_pneumoscan_checkpoint_is_refused(tmp_path):
    model, kw = small_model()
    payload = payload_for(model, kw)
    del payload["model_state"], payload["input_spec"]
    path = tmp_path / "incomplete.pth"
    save_checkpoint(payload, path)
    with pytest.raises(CheckpointError, match="model_state"):
        load_checkpoint(path)


def test_newer_format_is_refused(tmp_path):
    model, kw = small_model()
    payload = payload_for(model, kw)
    payload["format_version"] = FORMAT_VERSION + 1
    path = tmp_path / "newer.pth"
    save_checkpoint(payload, path)
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(path)


@pytest.mark.parametrize("version", ["5", 2.5, None, True])
def test_a_format_version_that_is_not_a_whole_number_is_refused(tmp_path, version):
    model, kw = small_model()
    payload = payload_for(model, kw)
    payload["format_version"] = version
    path = tmp_path / "odd.pth"
    torch.save(payload, path)  # as written by something else than save_checkpoint, which fixes the field
    with pytest.raises(CheckpointError, match="not a whole number"):
        load_checkpoint(path)


def test_weights_that_do_not_fit_the_architecture_are_refused(tmp_path):
    model, kw = small_model(width=0.25)
    payload = payload_for(model, kw)
    payload["model_kwargs"] = model_kwargs("medical_cnn_se", 1, 0.5)
    path = tmp_path / "mismatch.pth"
    save_checkpoint(payload, path)
    with pytest.raises(CheckpointError, match="do not match"):
        model_from_checkpoint(load_checkpoint(path))


def test_checkpoint_loads_without_unpickling_code(tmp_path):
    """A saved payload must load with weights_only=True (plain containers and tensors only)."""
    model, kw = small_model()
    path = tmp_path / "m.pth"
    save_checkpoint(payload_for(model, kw), path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    assert isinstance(obj, dict) and isinstance(obj["model_state"], dict)
