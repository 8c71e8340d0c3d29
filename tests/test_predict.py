"""predict.py: the one forward path (input contract, predictor) and what every caller shares through it."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pneumoscan.atomic import atomic_path
from pneumoscan.calibration import calibrated_probs
from pneumoscan.checkpoint import default_model_path, input_spec, load_checkpoint, save_checkpoint
from pneumoscan.data import load_labelled_folder
from pneumoscan.errors import CheckpointError, ImageError
from pneumoscan.evaluate import evaluate_imageset
from pneumoscan.heatmap import grad_cam
from pneumoscan.inference import MedicalImageInference
from pneumoscan.predict import InputSpec, Predictor
from pneumoscan.preprocess import COMPATIBLE_PREPROCESS, MAX_IMAGE_PIXELS, decode_image


@pytest.fixture(scope="module")
def shipped() -> dict:
    return load_checkpoint(default_model_path())


def test_input_spec_round_trip_and_shipped_contract(shipped):
    spec = input_spec(shipped)
    assert spec == InputSpec.from_dict(spec.to_dict())
    # the shipped model is a format-1 checkpoint: its four top-level keys become one spec
    assert (spec.image_size, spec.in_channels) == (224, 3) and spec.preprocess in COMPATIBLE_PREPROCESS
    assert 0 < spec.mean < 1 and 0 < spec.std < 1
    assert "image_size" not in shipped and "normalization" not in shipped


@pytest.mark.parametrize(("field", "value", "message"), [
    ("image_size", 100, "multiple of 32"), ("image_size", 0, "multiple of 32"),
    ("std", 0.0, "std"), ("in_channels", 2, "in_channels")])
def test_input_spec_refuses_impossible_values(field, value, message):
    kw = {"image_size": 64, "mean": 0.5, "std": 0.25, "in_channels": 1, field: value}
    with pytest.raises(ValueError, match=message):
        InputSpec(**kw)


def test_checkpoint_from_unknown_preprocessing_loads_with_a_warning(shipped, tmp_path, caplog):
    other = {**shipped, "input_spec": {**shipped["input_spec"], "preprocess": "letterbox-v9"}}
    save_checkpoint(other, tmp_path / "other.pth")
    assert input_spec(load_checkpoint(tmp_path / "other.pth")).preprocess == "letterbox-v9"
    assert "letterbox-v9" in caplog.text


def test_checkpoint_with_unusable_input_spec_is_refused_at_load(shipped, tmp_path):
    bad = {**shipped, "input_spec": {**shipped["input_spec"], "image_size": 7}}
    save_checkpoint(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="input specification"):
        load_checkpoint(tmp_path / "bad.pth")


def test_temperature_is_applied_in_float64_in_one_place():
    logits = torch.tensor([[0.3, 1.9], [2.0, -1.0]])
    p = calibrated_probs(logits, 0.7)
    assert p.dtype == torch.float64
    torch.testing.assert_close(p, torch.softmax(logits.double() / 0.7, -1))
    torch.testing.assert_close(calibrated_probs(logits, None), torch.softmax(logits.double(), -1))


def test_inference_evaluation_and_gradcam_share_the_forward_path(shipped, train_dir, tmp_path):
    """The same film gives the same probability through predict, evaluate and the predictor itself."""
    folder = tmp_path / "set"
    files = {}
    for cls in ("NORMAL", "PNEUMONIA"):
        (folder / cls).mkdir(parents=True)
        for src in sorted((train_dir / cls).glob("*.jpeg"))[:3]:
            (folder / cls / src.name).symlink_to(src)
            files[str(folder / cls / src.name)] = src
    predictor = Predictor.from_checkpoint(shipped)
    data, bad = load_labelled_folder(str(folder), predictor.spec.image_size, cache_dir="none")
    assert not bad
    _, p_eval = evaluate_imageset(predictor, data, shipped["threshold"], n_boot=10)

    engine = MedicalImageInference(gate=False, device="cpu", backend="torch")
    outcomes = engine.predict_batch(data.paths)
    p_engine = np.array([r.probabilities["PNEUMONIA"] for r in outcomes])
    np.testing.assert_allclose(p_engine, p_eval, rtol=0, atol=1e-6)

    pixels = predictor.spec.pixels(decode_image(data.paths[0], 224).gray)
    assert np.array_equal(pixels, data.images[0].numpy())  # the cached training input is the inference input
    x = predictor.spec.to_tensor(torch.from_numpy(pixels)[None])
    np.testing.assert_array_equal(engine.gradcam(decode_image(data.paths[0], 224)), grad_cam(predictor.model, x))


def test_importing_pneumoscan_changes_no_global_state():
    """An application embedding the library keeps its PIL pixel limit and matplotlib backend."""
    code = (
        "import matplotlib, PIL.Image as I\n"
        "raw = lambda: dict.__getitem__(matplotlib.rcParams, 'backend')\n"
        "before = (I.MAX_IMAGE_PIXELS, raw())\n"
        "import pneumoscan.cli, pneumoscan.train, pneumoscan.inference, pneumoscan.report, pneumoscan.plots\n"
        "import pneumoscan.evaluate, pneumoscan.heatmap, pneumoscan.predict\n"
        "assert (I.MAX_IMAGE_PIXELS, raw()) == before, ((I.MAX_IMAGE_PIXELS, raw()), before)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "MPLBACKEND": "TkAgg"})
    assert proc.returncode == 0, proc.stderr


def test_pixel_limit_is_ours_whatever_the_global_says(tmp_path, monkeypatch):
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 10
    path = tmp_path / "huge.png"
    Image.new("1", (side, side)).save(path)  # bilevel: 13 MB in memory, a few kB on disk
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # an application that turned PIL's check off
    with pytest.raises(ImageError, match="allowed"):
        decode_image(path)


def test_atomic_path_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.json"]
    with atomic_path(target, durable=True) as tmp:
        assert tmp.suffix == ".json"
        tmp.write_text("new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out.json"]
