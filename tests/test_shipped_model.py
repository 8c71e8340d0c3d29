"""The model shipped in the package: loads without a path, is deterministic, applies its calibration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shipped import SHIPPED_VERSION

from pneumoscan.checkpoint import default_model_path, load_checkpoint, model_from_checkpoint, save_checkpoint
from pneumoscan.cli import predict_main
from pneumoscan.inference import MedicalImageInference
from pneumoscan.preprocess import decode_image

TRAIN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chest_xray" / "train"
pytestmark = pytest.mark.skipif(not TRAIN.is_dir(), reason=f"real chest X-rays not found at {TRAIN}")


@pytest.fixture(scope="module")
def engine() -> MedicalImageInference:
    """The fp32 torch reference, against which calibration and threshold are checked exactly."""
    return MedicalImageInference(backend="torch")


def test_default_backend_on_cpu_is_int8_and_agrees_with_the_reference(engine, images):
    pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed")
    fast = MedicalImageInference(device="cpu")
    assert fast.backend == "onnx-int8" and fast.info["backend"] == "onnx-int8"
    for path in images:
        a, b = engine.predict_image(path), fast.predict_image(path)
        assert (a.backend, b.backend) == ("torch", "onnx-int8")
        assert a.prediction == b.prediction
        assert b.probabilities["PNEUMONIA"] == pytest.approx(a.probabilities["PNEUMONIA"], abs=0.05)


@pytest.fixture(scope="module")
def images() -> list[Path]:
    return [sorted((TRAIN / c).glob("*.jpeg"))[i] for c in ("NORMAL", "PNEUMONIA") for i in (0, 7)]


def test_loads_without_a_path(engine):
    assert Path(engine.model_path) == default_model_path()
    assert engine.model_version == SHIPPED_VERSION
    assert engine.info["calibrated"] is True
    assert default_model_path().stat().st_size < 25 * 1024 * 1024


def test_same_result_twice(engine, images):
    first = [engine.predict_image(p) for p in images]
    second = [engine.predict_image(p) for p in images]
    assert [r.probabilities for r in first] == [r.probabilities for r in second]
    assert [r.prediction for r in first] == [r.prediction for r in second]
    # batching changes float summation order only: same answer to far below any reported precision
    batched = engine.predict_batch(images)
    for a, b in zip(first, batched):
        assert a.probabilities["PNEUMONIA"] == pytest.approx(b.probabilities["PNEUMONIA"], abs=1e-6)
        assert a.prediction == b.prediction


def test_applies_stored_temperature_and_threshold(engine, images):
    ckpt = load_checkpoint(default_model_path())
    assert ckpt["temperature"] is not None and ckpt["temperature"] != 1.0
    for path in images:
        result = engine.predict_image(path)
        # computed here by hand, not through Predictor: the stored input contract and temperature
        spec = ckpt["input_spec"]
        pixels = np.asarray(decode_image(path, spec["image_size"]).gray.resize(
            (spec["image_size"], spec["image_size"]), Image.BILINEAR), dtype=np.float32) / 255.0
        x = ((torch.from_numpy(pixels) - spec["mean"]) / spec["std"]).expand(1, spec["in_channels"], -1, -1)
        with torch.no_grad():
            logits = model_from_checkpoint(ckpt)(x)[0]
        expected = torch.softmax(logits.double() / ckpt["temperature"], -1)
        assert result.probabilities["PNEUMONIA"] == pytest.approx(float(expected[1]), abs=1e-5)
        assert result.threshold == pytest.approx(ckpt["threshold"])
        assert result.prediction == ("PNEUMONIA" if expected[1] >= ckpt["threshold"] else "NORMAL")
        assert result.calibrated and result.model_version == SHIPPED_VERSION


def test_checkpoint_without_calibration_still_works(tmp_path, images):
    ckpt = load_checkpoint(default_model_path())
    ckpt["temperature"] = None
    ckpt["threshold"] = 0.5
    save_checkpoint(ckpt, tmp_path / "uncalibrated.pth")
    raw = MedicalImageInference(tmp_path / "uncalibrated.pth")
    cal = MedicalImageInference()
    for path in images:
        r, c = raw.predict_image(path), cal.predict_image(path)
        assert r.calibrated is False and any("uncalibrated" in w for w in r.warnings)
        assert r.probabilities != c.probabilities
        assert sum(r.probabilities.values()) == pytest.approx(1.0)
    out = tmp_path / "r.json"
    assert predict_main(["--model_path", str(tmp_path / "uncalibrated.pth"), "--image_path", str(images[0]),
                         "--output_path", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["model"]["calibrated"] is False and doc["results"][0]["calibrated"] is False


def test_cli_predict_uses_shipped_model(tmp_path, images):
    out = tmp_path / "r.json"
    assert predict_main(["--image_path", str(images[-1]), "--output_path", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["model"]["model_version"] == SHIPPED_VERSION
    result = doc["results"][0]
    assert result["model_version"] == SHIPPED_VERSION
    assert result["threshold"] == pytest.approx(load_checkpoint(default_model_path())["threshold"])
