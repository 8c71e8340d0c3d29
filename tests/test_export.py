"""export.py and backends.py: the ONNX graph equals the torch model, carries its metadata, and the
int8 backend predicts the shipped model's labels; ``pneumoscan export`` writes or refuses with exit 2."""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from shipped import SHIPPED_VERSION

from pneumoscan.backends import (
    BACKENDS,
    OnnxPredictor,
    int8_model,
    make_predictor,
    onnx_providers,
    resolve_backend,
)
from pneumoscan.checkpoint import default_model_path, load_checkpoint, model_payload, save_checkpoint
from pneumoscan.cli import predict_main
from pneumoscan.errors import CheckpointError, DataError
from pneumoscan.export import (
    INT8_RECIPE,
    OnnxUnavailableError,
    calibration_ranges,
    export_main,
    export_onnx,
    onnx_model,
    quantize_int8,
    read_metadata,
    require,
    save_onnx,
    stored_ranges,
    weights_digest,
)
from pneumoscan.model import model_from_kwargs, model_kwargs
from pneumoscan.predict import InputSpec, Predictor
from pneumoscan.preprocess import load_image

ort = pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed")

TINY_SIZE = 64


@pytest.fixture(scope="module")
def tiny() -> dict:
    """A quarter-width MedicalCNN at 64 px, calibrated and thresholded, without a gate."""
    torch.manual_seed(0)
    kw = model_kwargs("medical_cnn", 3, width=0.25)
    return model_payload(model_from_kwargs(kw), arch="medical_cnn", model_kw=kw,
                         spec=InputSpec(TINY_SIZE, 0.48, 0.24, 3), config={}, temperature=0.7, threshold=0.6,
                         model_version="tiny-test")


@pytest.fixture(scope="module")
def tiny_int8(tiny, train_dir) -> dict:
    """``tiny`` carrying its int8 calibration (as the shipped model does): its int8 graph builds without data."""
    ranges = calibration_ranges(onnx_model(tiny), real_images(train_dir, TINY_SIZE, 4, skip=50))
    return {**tiny, "int8_calibration": {"recipe": INT8_RECIPE, "images": 8, "ranges": ranges}}


@pytest.fixture(scope="module")
def shipped() -> dict:
    return load_checkpoint(default_model_path())


@pytest.fixture(scope="module")
def shipped_onnx(shipped):
    """The shipped model's float32 graph, in memory."""
    return onnx_model(shipped)


def real_images(train_dir, size: int, per_class: int, skip: int = 0) -> torch.Tensor:
    """uint8 (N, size, size) model inputs of real training films, ``per_class`` of each class."""
    files = [f for cls in ("NORMAL", "PNEUMONIA")
             for f in sorted((train_dir / cls).glob("*.jpeg"))[skip::97][:per_class]]
    return torch.from_numpy(np.stack([load_image(f, size) for f in files]))


def test_onnx_graph_equals_torch_with_any_batch_size(tiny, train_dir, tmp_path):
    path = export_onnx(tiny, tmp_path / "tiny.onnx")
    images = real_images(train_dir, TINY_SIZE, 2)[:3]  # exported with a batch of 2, run with 3
    expected = Predictor.from_checkpoint(tiny).outputs(images)
    got = make_predictor(tiny, "cpu", "onnx").outputs(images)
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=1e-4)
    assert len(got.features) == len(expected.features) == 5
    for g, e in zip(got.features, expected.features):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-4)

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("pixels", "tensor(uint8)", [TINY_SIZE, TINY_SIZE])
    assert [o.name for o in session.get_outputs()] == ["logits", *(f"features_{i}" for i in range(5))]
    logits = session.run(["logits"], {"pixels": images.numpy()})[0]
    np.testing.assert_allclose(logits, expected.logits.numpy(), rtol=0, atol=1e-4)


def test_onnx_graph_of_an_equalizing_model_equals_torch(tiny, train_dir):
    ckpt = {**tiny, "input_spec": {**tiny["input_spec"], "intensity": "equalize"}}
    images = real_images(train_dir, TINY_SIZE, 2)
    expected = Predictor.from_checkpoint(ckpt).logits(images)
    assert (expected - Predictor.from_checkpoint(tiny).logits(images)).abs().max() > 1e-3  # equalising changes them
    onnx = make_predictor(ckpt, "cpu", "onnx")
    for batch in (images[:1], images[:3], images):  # traced with a batch of 2
        torch.testing.assert_close(onnx.logits(batch), expected[:len(batch)], rtol=0, atol=1e-4)


def test_metadata_is_stored_and_parsed_back(shipped, shipped_onnx, tiny, tmp_path):
    meta = read_metadata(shipped_onnx)
    assert meta["input_spec"] == InputSpec.from_dict(shipped["input_spec"])
    assert meta["temperature"] == shipped["temperature"] and meta["threshold"] == shipped["threshold"]
    assert meta["class_names"] == ["NORMAL", "PNEUMONIA"] and meta["model_version"] == SHIPPED_VERSION
    assert meta["weights_sha256"] == weights_digest(shipped)
    assert meta["ood_gate"]["present"] and meta["ood_gate"]["layers"] == [1, 2, 3, 4]
    assert meta["ood_gate"]["fitted_on"] == "validation radiographs"
    assert meta["ood_gate"]["threshold"] == shipped["ood_gate"]["threshold"]
    assert "checkpoint" in meta["ood_gate"]["note"]
    scope = meta["scope_classifier"]
    assert scope["present"] and {"lateral", "adult_frontal"} <= set(scope["classes"])
    assert meta["scope_classifier"]["threshold"] == shipped["scope_classifier"]["threshold"]
    assert "graph alone answers them all" in meta["scope_classifier"]["note"]
    tiny_meta = read_metadata(export_onnx(tiny, tmp_path / "tiny.onnx"))
    assert tiny_meta["ood_gate"] == tiny_meta["scope_classifier"] == {"present": False}
    assert tiny_meta["temperature"] == 0.7
    assert read_metadata(_as_format_1(onnx_model(tiny)))["scope_classifier"] is None  # not said then: unknown


def test_exporting_a_checkpoint_with_scope_checks_warns_that_the_graph_has_none(tmp_path, tiny, capsys):
    out = tmp_path / "shipped.onnx"
    assert export_main(["--format", "onnx", "--output_path", str(out)]) == 0
    err = capsys.readouterr().err
    assert "the ONNX graph answers every input: this checkpoint's out-of-scope gate and scope classifier" in err
    model_path = tmp_path / "tiny.pth"
    save_checkpoint(tiny, model_path)
    assert export_main(["--format", "onnx", "--model_path", str(model_path), "--output_path",
                        str(tmp_path / "tiny.onnx")]) == 0
    assert "answers every input" not in capsys.readouterr().err  # nothing to leave behind


def test_a_site_export_names_its_own_checkpoint_file_beside_the_shared_weights(tiny, tmp_path):
    """A recalibrated checkpoint keeps the weights: their digest is the same, so it is called weights_sha256, and
    the .pth's own sha256 tells the two exports apart (format 1 called the weights digest checkpoint_sha256)."""
    onnx = pytest.importorskip("onnx")
    base, site = tmp_path / "base.pth", tmp_path / "site.pth"
    save_checkpoint(tiny, base)
    save_checkpoint({**tiny, "temperature": 1.3, "threshold": 0.35, "model_version": "tiny-test+site"}, site)
    metas = {}
    for src in (base, site):
        out = tmp_path / f"{src.stem}.onnx"
        assert export_main(["--format", "onnx", "--model_path", str(src), "--output_path", str(out)]) == 0
        assert "checkpoint_sha256" not in {p.key for p in onnx.load(str(out)).metadata_props}
        metas[src.stem] = read_metadata(out)
        assert metas[src.stem]["checkpoint_file_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert metas["base"]["weights_sha256"] == metas["site"]["weights_sha256"] == weights_digest(tiny)
    assert metas["base"]["checkpoint_file_sha256"] != metas["site"]["checkpoint_file_sha256"]
    assert (metas["site"]["temperature"], metas["site"]["threshold"]) == (1.3, 0.35)
    assert metas["site"]["model_version"] == "tiny-test+site" and metas["site"]["format"] == "pneumoscan-onnx-2"
    assert read_metadata(onnx_model(tiny))["checkpoint_file_sha256"] is None  # not from a file: not claimed


def _as_format_1(model):
    """``model`` with the metadata an earlier pneumoscan wrote: format 1, the weights digest as checkpoint_sha256."""
    import onnx

    props = {p.key: p.value for p in model.metadata_props}
    props["pneumoscan.format"] = "pneumoscan-onnx-1"
    props["checkpoint_sha256"] = props.pop("weights_sha256")
    for new_in_format_2 in ("checkpoint_file_sha256", "scope_classifier"):
        props.pop(new_in_format_2, None)
    onnx.helper.set_model_props(model, props)
    return model


def test_a_format_1_int8_cache_file_is_still_read(tiny, tmp_path, caplog):
    import onnx

    cache = tmp_path / "cache"
    old = cache / f"{weights_digest(tiny)[:24]}-{INT8_RECIPE}.onnx"
    old.parent.mkdir()
    model = _as_format_1(onnx_model(tiny))
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, "int8_recipe": INT8_RECIPE})
    onnx.save_model(model, str(old))
    before = old.read_bytes()
    meta = read_metadata(old)
    assert (meta["format"], meta["weights_sha256"], meta["checkpoint_file_sha256"]) == (
        "pneumoscan-onnx-1", weights_digest(tiny), None)
    # tiny carries no int8 calibration: anything but a cache hit would raise DataError
    with caplog.at_level(logging.WARNING, logger="pneumoscan"):
        assert int8_model(tiny, cache_dir=cache) == old
    assert old.read_bytes() == before and not caplog.records


@pytest.mark.parametrize("damage", ["truncated", "not_onnx", "no_metadata_keys"])
def test_a_damaged_int8_cache_file_is_rebuilt(damage, tiny_int8, train_dir, tmp_path, caplog):
    import onnx

    cache = tmp_path / "cache"
    images = real_images(train_dir, TINY_SIZE, 1)
    expected = make_predictor(tiny_int8, "cpu", "onnx-int8", cache_dir=cache).logits(images)
    (cached,) = cache.iterdir()
    if damage == "truncated":  # e.g. a disk that filled up under another tool, or a copy cut short
        cached.write_bytes(cached.read_bytes()[:1000])
    elif damage == "not_onnx":
        cached.write_text("not an ONNX model")
    else:
        model = onnx.load(str(cached))
        props = {p.key: p.value for p in model.metadata_props}
        del props["input_spec"]
        onnx.helper.set_model_props(model, props)
        onnx.save_model(model, str(cached))
    with caplog.at_level(logging.WARNING, logger="pneumoscan"):
        again = make_predictor(tiny_int8, "cpu", "onnx-int8", cache_dir=cache)
    assert f"rebuilding unreadable cached int8 model {cached}" in caplog.text
    torch.testing.assert_close(again.logits(images), expected, rtol=0, atol=0)
    assert read_metadata(cached)["weights_sha256"] == weights_digest(tiny_int8)


def test_an_int8_cache_that_cannot_be_written_builds_in_memory(tiny_int8, train_dir, tmp_path, caplog):
    """A read-only home (containers) or a full disk must not stop predict's default backend."""
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    images = real_images(train_dir, TINY_SIZE, 1)
    with caplog.at_level(logging.WARNING, logger="pneumoscan"):
        engine = make_predictor(tiny_int8, "cpu", "onnx-int8", cache_dir=blocker / "onnx")
    assert f"cannot cache the int8 model in {blocker / 'onnx'}" in caplog.text and "XDG_CACHE_HOME" in caplog.text
    cached = make_predictor(tiny_int8, "cpu", "onnx-int8", cache_dir=tmp_path / "ok")
    torch.testing.assert_close(engine.logits(images), cached.logits(images), rtol=0, atol=0)
    assert blocker.read_text().startswith("a file") and sorted(p.name for p in tmp_path.iterdir()) == ["cache", "ok"]


def test_reading_a_file_that_is_not_onnx_says_so(tmp_path, real_jpeg):
    film = tmp_path / "x.onnx"  # a film saved under the model's name
    film.write_bytes(real_jpeg.read_bytes())
    with pytest.raises(CheckpointError, match=r"x.onnx is not a readable ONNX model \(truncated, corrupt"):
        read_metadata(film)


def test_the_onnx_file_and_its_metadata_alone_give_pneumoscans_answers(shipped, fullres_dir, tmp_path):
    """What another runtime does with an export of a site checkpoint (its own temperature, intercept and threshold):
    stretch-resize, run the graph, apply the documented formula with the metadata. Same P(PNEUMONIA), same call."""
    from pneumoscan.inference import MedicalImageInference

    site = tmp_path / "site.pth"
    save_checkpoint({**shipped, "temperature": 0.9, "calibration_bias": 0.4, "threshold": 0.6,
                     "model_version": "pneumoscan-v2.1+site"}, site)
    out = tmp_path / "site.onnx"
    assert export_main(["--format", "onnx", "--model_path", str(site), "--output_path", str(out)]) == 0
    meta = read_metadata(out)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    films = [f for cls in ("NORMAL", "PNEUMONIA") for f in sorted((fullres_dir / cls).glob("*.jpeg"))[:3]]
    pixels = np.stack([load_image(f, meta["input_spec"].image_size) for f in films])
    (logits,) = session.run(["logits"], {"pixels": pixels})
    p_onnx = 1 / (1 + np.exp(-((logits[:, 1] - logits[:, 0]) / meta["temperature"] + meta["calibration_bias"])))
    engine = MedicalImageInference(site, device="cpu", backend="torch", gate=False)
    answers = [engine.predict_image(f) for f in films]
    np.testing.assert_allclose(p_onnx, [a.probabilities["PNEUMONIA"] for a in answers], rtol=0, atol=1e-5)
    assert [("PNEUMONIA" if p >= meta["threshold"] else "NORMAL") for p in p_onnx] == [a.prediction for a in answers]
    assert {a.model_version for a in answers} == {meta["model_version"]} and meta["threshold"] == engine.threshold


def test_make_predictor_has_the_predictor_interface(tiny, train_dir):
    images = real_images(train_dir, TINY_SIZE, 1)
    reference = make_predictor(tiny, "cpu", "torch")
    onnx = make_predictor(tiny, "auto", "onnx")  # auto: the ONNX backends run on the CPU
    assert (onnx.spec, onnx.temperature, onnx.device) == (reference.spec, reference.temperature, torch.device("cpu"))
    logits = onnx.logits(images, batch_size=1)
    assert logits.shape == (2, 2) and logits.dtype == torch.float32
    torch.testing.assert_close(onnx.probabilities(logits), reference.probabilities(logits))
    assert onnx.outputs(images[:0]).logits.shape == (0, 2)
    np.testing.assert_array_equal(onnx.gradcam(images[0]), reference.gradcam(images[0]))
    with pytest.raises(ValueError, match="choose one of auto, torch, onnx, onnx-int8"):
        make_predictor(tiny, "cpu", "tensorrt")
    with pytest.raises(ValueError, match="runs on the CPU"):
        make_predictor(tiny, torch.device("cuda"), "onnx-int8")
    assert BACKENDS == ("torch", "onnx", "onnx-int8")


def test_the_onnx_backend_on_cuda_runs_on_the_gpu_asked_for(tiny, train_dir):
    """Under torchrun each rank asks for cuda:<local rank>; ONNX Runtime's CUDA provider without a device_id
    put them all on GPU 0. The CUDA provider needs onnxruntime-gpu, so a CPU session checks the same path."""
    assert onnx_providers(torch.device("cuda", 3)) == [("CUDAExecutionProvider", {"device_id": 3}),
                                                       "CPUExecutionProvider"]
    assert onnx_providers(torch.device("cpu")) == ["CPUExecutionProvider"]
    engine = OnnxPredictor(onnx_model(tiny).SerializeToString(), tiny, providers=[("CPUExecutionProvider", {})])
    assert engine.device == torch.device("cpu")
    images = real_images(train_dir, TINY_SIZE, 1)
    torch.testing.assert_close(engine.logits(images), Predictor.from_checkpoint(tiny).logits(images), rtol=0,
                               atol=1e-4)


def test_int8_shipped_model_keeps_labels_on_real_films(shipped, shipped_onnx, train_dir, tmp_path):
    """A quantised copy of the shipped model, calibrated on films other than those it is checked on."""
    ranges = calibration_ranges(shipped_onnx, real_images(train_dir, 224, 4, skip=50))
    path = quantize_int8(shipped_onnx, ranges, tmp_path / "int8.onnx")
    assert read_metadata(path)["weights_sha256"] == weights_digest(shipped)
    images = real_images(train_dir, 224, 4)
    torch_p = Predictor.from_checkpoint(shipped)
    int8_p = OnnxPredictor(path, shipped)
    p_ref = torch_p.probabilities(torch_p.logits(images))[:, 1]
    p_int8 = int8_p.probabilities(int8_p.logits(images))[:, 1]
    assert torch.equal(p_int8 >= shipped["threshold"], p_ref >= shipped["threshold"])
    assert float((p_int8 - p_ref).abs().max()) < 0.05


def test_int8_backend_is_cached_by_checkpoint(tiny, train_dir, make_dataset, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="calibration_dir"):
        make_predictor(tiny, "cpu", "onnx-int8", cache_dir=cache)
    files = {cls: sorted((train_dir / cls).glob("*.jpeg"))[:12] for cls in ("NORMAL", "PNEUMONIA")}
    data = make_dataset(tmp_path / "data", files)
    built = make_predictor(tiny, "cpu", "onnx-int8", calibration_dir=data, cache_dir=cache)
    (cached,) = cache.iterdir()
    assert cached.name.startswith(weights_digest(tiny)[:24])
    again = make_predictor(tiny, "cpu", "onnx-int8", cache_dir=cache)  # no calibration data needed now
    images = real_images(train_dir, TINY_SIZE, 1)
    torch.testing.assert_close(again.logits(images), built.logits(images), rtol=0, atol=0)


def test_export_cli_writes_a_model(tiny, tmp_path):
    model_path = tmp_path / "tiny.pth"
    save_checkpoint(tiny, model_path)
    out = tmp_path / "out" / "tiny.onnx"
    assert export_main(["--format", "onnx", "--model_path", str(model_path), "--output_path", str(out)]) == 0
    assert read_metadata(out)["model_version"] == "tiny-test"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind


@pytest.mark.parametrize(("case", "message"), [
    ("format", "unknown export format 'tflite'"),
    ("model", "does not exist"),
    ("unwritable", "cannot write"),
    ("folder", "is a folder"),
    ("int8_without_data", "carries no int8 calibration: pass --calibration_dir"),
    ("not_onnx", "does not end in .onnx; name the ONNX model file so (e.g. m.onnx)"),
    ("no_suffix", "does not end in .onnx"),
    ("calibration_without_int8", "calibrate an int8 model: add --quantize int8"),
    ("images_without_int8", "calibrate an int8 model: add --quantize int8"),
])
def test_export_cli_refuses_bad_input(case, message, tiny, tmp_path, capsys):
    model_path = tmp_path / "tiny.pth"
    save_checkpoint(tiny, model_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    argv = {"format": ["--format", "tflite"],
            "model": ["--model_path", str(tmp_path / "missing.pth")],
            "unwritable": ["--output_path", str(blocker / "model.onnx")],
            "folder": ["--output_path", str(tmp_path)],
            "int8_without_data": ["--quantize", "int8"],
            "not_onnx": ["--output_path", str(tmp_path / "m.txt")],
            "no_suffix": ["--output_path", str(tmp_path / "m")],
            "calibration_without_int8": ["--calibration_dir", str(tmp_path)],
            "images_without_int8": ["--calibration_images", "64"]}[case]
    base = {"--format": "onnx", "--model_path": str(model_path), "--output_path": str(tmp_path / "m.onnx")}
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = value
    assert export_main([x for kv in base.items() for x in kv]) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "tiny.pth"]  # nothing written, no temporary


@pytest.mark.parametrize(("change", "message"), [
    ({"stem": "conv7"}, "unexpected keyword argument 'stem'"),  # an option of another pneumoscan version
    ({"widths": None}, "TypeError"),
    ({"ensemble": [{"in_channels": 3}], "norms": []}, "one (mean, std) per member"),
])
def test_export_of_an_architecture_this_pneumoscan_cannot_build_says_so(change, message, tiny, tmp_path, capsys):
    model_path = tmp_path / "other.pth"
    save_checkpoint({**tiny, "model_kwargs": {**tiny["model_kwargs"], **change}}, model_path)
    assert export_main(["--format", "onnx", "--model_path", str(model_path), "--output_path",
                        str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "architecture ('medical_cnn') cannot be built from its model_kwargs" in err and message in err
    assert "another pneumoscan version, or is damaged" in err and not (tmp_path / "m.onnx").exists()


def test_export_cli_replaces_an_existing_file_only_with_overwrite(tiny, tmp_path, capsys):
    model_path, out = tmp_path / "tiny.pth", tmp_path / "deployed.onnx"
    save_checkpoint(tiny, model_path)
    out.write_bytes(b"the model in production")
    argv = ["--format", "onnx", "--model_path", str(model_path), "--output_path", str(out)]
    assert export_main(argv) == 2
    assert "exists already; give a new file name, or --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"the model in production"
    assert export_main([*argv, "--overwrite"]) == 0
    assert read_metadata(out)["model_version"] == "tiny-test"
    with pytest.raises(FileExistsError):  # what the command does without --overwrite: a file made meanwhile stays
        save_onnx(onnx_model(tiny), out, exclusive=True)
    assert read_metadata(out)["model_version"] == "tiny-test"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deployed.onnx", "tiny.pth"]


@pytest.mark.parametrize("backend", ["auto", "torch", "onnx"])
def test_predict_says_when_calibration_dir_is_not_used(backend, tiny, train_dir, real_jpeg, tmp_path, capsys):
    """tiny carries no int8 calibration, so auto runs torch: the data given to calibrate int8 is not used."""
    model_path = tmp_path / "tiny.pth"
    save_checkpoint(tiny, model_path)
    out = tmp_path / "r.json"
    assert predict_main(["--image_path", str(real_jpeg), "--model_path", str(model_path), "--backend", backend,
                         "--calibration_dir", str(train_dir.parent), "--output_path", str(out)]) == 0
    expected = "torch" if backend == "auto" else backend
    assert json.loads(out.read_text())["results"][0]["backend"] == expected
    err = capsys.readouterr().err
    assert f"--calibration_dir is not used: it calibrates the onnx-int8 backend's int8 model, and this run uses " \
           f"the {expected} backend" in err
    assert ("give --backend onnx-int8" in err) == (backend == "auto")


def test_an_interrupted_int8_export_leaves_nothing_behind(train_dir, make_dataset, tmp_path):
    """Ctrl-C while the int8 model is calibrated: exit 130 with a line saying so, no traceback, no file."""
    files = {cls: sorted((train_dir / cls).glob("*.jpeg"))[:40] for cls in ("NORMAL", "PNEUMONIA")}
    data = make_dataset(tmp_path / "data", files)
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "pneumoscan", "export", "--format", "onnx", "--quantize", "int8",
                             "--calibration_dir", str(data), "--output_path", str(out)],
                            stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # interrupted once the calibration has started
        seen.append(line)
        if "calibrating on" in line:
            proc.send_signal(signal.SIGINT)
            break
    err = "".join(seen) + proc.stderr.read()
    assert proc.wait(timeout=60) == 130, err
    assert "interrupted; nothing was written" in err and "Traceback" not in err
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_an_int8_calibration_of_another_recipe_is_named_not_called_missing(tiny_int8, tmp_path, capsys, caplog):
    """A checkpoint calibrated by an earlier pneumoscan: auto ran int8 then and runs torch now, so it says why."""
    old = {**tiny_int8, "int8_calibration": {**tiny_int8["int8_calibration"], "recipe": "qdq-u8s8-older-v1"}}
    with caplog.at_level(logging.WARNING, logger="pneumoscan"):
        assert resolve_backend(old, "cpu", "auto") == "torch"
    assert "not onnx-int8: its int8 calibration was made for the recipe 'qdq-u8s8-older-v1'" in caplog.text
    assert "experiments/int8_calibrate.py" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pneumoscan"):
        assert resolve_backend(tiny_int8, "cpu", "auto") == "onnx-int8"
        assert resolve_backend({**tiny_int8, "int8_calibration": None}, "cpu", "auto") == "torch"
    assert not caplog.records  # current, or none at all (documented): nothing to say
    with pytest.raises(DataError, match="made for the recipe 'qdq-u8s8-older-v1'.*pass calibration_dir"):
        make_predictor(old, "cpu", "onnx-int8", cache_dir=tmp_path / "cache")
    model_path = tmp_path / "old.pth"
    save_checkpoint(old, model_path)
    assert export_main(["--format", "onnx", "--quantize", "int8", "--model_path", str(model_path),
                        "--output_path", str(tmp_path / "m.onnx")]) == 2
    assert "made for the recipe 'qdq-u8s8-older-v1'" in capsys.readouterr().err


def test_missing_onnxruntime_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(OnnxUnavailableError, match=r"pip install 'pneumoscan\[onnx\]'"):
        require("onnxruntime")


def test_importing_the_package_does_not_import_onnx():
    code = ("import sys, pneumoscan.inference, pneumoscan.backends, pneumoscan.export\n"
            "assert not {'onnx', 'onnxruntime'} & set(sys.modules), 'onnx imported at import time'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_shipped_model_builds_its_int8_graph_from_stored_ranges(shipped, tmp_path, train_dir):
    """No data needed after install: the checkpoint's ranges rebuild the int8 graph, which follows torch."""
    assert stored_ranges(shipped) is not None
    engine = make_predictor(shipped, "cpu", "onnx-int8", cache_dir=tmp_path)
    assert [p.suffix for p in tmp_path.iterdir()] == [".onnx"]  # built once, cached
    images = real_images(train_dir, 224, 6)
    reference = Predictor.from_checkpoint(shipped)
    p_ref = reference.probabilities(reference.logits(images))[:, 1]
    p_int8 = engine.probabilities(engine.logits(images))[:, 1]
    assert float((p_int8 - p_ref).abs().max()) < 0.05
    assert torch.equal(p_int8 >= shipped["threshold"], p_ref >= shipped["threshold"])


def test_ranges_for_another_graph_are_refused(shipped_onnx, tmp_path):
    with pytest.raises(ValueError, match="do not fit this graph"):
        quantize_int8(shipped_onnx, {"some/other/tensor": [0.0, 1.0]}, tmp_path / "x.onnx")
