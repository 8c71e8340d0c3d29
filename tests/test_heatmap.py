"""heatmap.py: Grad-CAM on the shipped model and real films, overlays at original size, the lung-box share."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pneumoscan.checkpoint import default_model_path, input_spec, load_checkpoint, model_from_checkpoint
from pneumoscan.cli import predict_main
from pneumoscan.heatmap import CENTRAL_LUNG_BOX, box_pixels, central_lung_fraction, grad_cam, overlay_png
from pneumoscan.model import MedicalCNN
from pneumoscan.preprocess import open_image

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")
GLOBAL_HOOK_DICTS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                     "_global_backward_pre_hooks")


@pytest.fixture(scope="module")
def ckpt() -> dict:
    return load_checkpoint(default_model_path())


@pytest.fixture(scope="module")
def model(ckpt) -> MedicalCNN:
    """The shipped model as MedicalImageInference holds it: eval mode, channels_last."""
    return model_from_checkpoint(ckpt).to(memory_format=torch.channels_last)


def model_input(ckpt: dict, gray: Image.Image) -> torch.Tensor:
    spec = input_spec(ckpt)
    return spec.to_tensor(torch.from_numpy(spec.pixels(gray))[None])


@pytest.fixture(scope="module")
def pneumonia_x(ckpt, train_dir) -> torch.Tensor:
    """A real 224 px PNEUMONIA film as the model's input."""
    return model_input(ckpt, open_image(sorted((train_dir / "PNEUMONIA").iterdir())[0]))


@pytest.fixture(scope="module")
def cam_pneumonia(model, pneumonia_x) -> np.ndarray:
    return grad_cam(model, pneumonia_x)


def tiny_model(zero_head: bool = False) -> MedicalCNN:
    torch.manual_seed(0)
    model = MedicalCNN(in_channels=1, widths=(8, 8, 8, 8, 8)).eval()
    if zero_head:
        torch.nn.init.zeros_(model.fc2.weight)
        torch.nn.init.zeros_(model.fc2.bias)
    return model


def test_grad_cam_on_real_film_is_a_unit_map_at_input_resolution(cam_pneumonia, pneumonia_x):
    assert cam_pneumonia.shape == tuple(pneumonia_x.shape[-2:]) == (224, 224)
    assert cam_pneumonia.dtype == np.float32
    assert np.isfinite(cam_pneumonia).all()
    assert cam_pneumonia.min() >= 0.0
    assert cam_pneumonia.max() == pytest.approx(1.0)


CONTEXTS = {"grad": contextlib.nullcontext, "inference_mode": torch.inference_mode,
            "bfloat16_autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}  # as Predictor runs on CUDA


@pytest.mark.parametrize("context", CONTEXTS)
def test_grad_cam_leaves_model_unchanged_under_any_grad_mode(model, pneumonia_x, cam_pneumonia, context):
    """Inside a caller's inference_mode or autocast too: the same fp32 map, and nothing left on the model."""
    with torch.no_grad():
        before = model(pneumonia_x)
    with CONTEXTS[context]():
        cam = grad_cam(model, pneumonia_x)
    assert cam.dtype == np.float32
    np.testing.assert_allclose(cam, cam_pneumonia, atol=1e-5)
    for name, module in model.named_modules():
        for attr in HOOK_DICTS:
            assert not getattr(module, attr, {}), f"{name or 'model'}.{attr} left behind"
    for attr in GLOBAL_HOOK_DICTS:
        assert not getattr(torch.nn.modules.module, attr, {}), attr
    assert not model.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert not pneumonia_x.requires_grad
    with torch.no_grad():
        assert torch.equal(model(pneumonia_x), before)


def test_grad_cam_depends_on_target_class(model, pneumonia_x, cam_pneumonia):
    cam_normal = grad_cam(model, pneumonia_x, target_class=0)
    assert cam_normal.shape == cam_pneumonia.shape and np.isfinite(cam_normal).all()
    assert np.abs(cam_normal - cam_pneumonia).max() > 0.3
    assert np.corrcoef(cam_normal.ravel(), cam_pneumonia.ravel())[0, 1] < 0.5


def test_overlay_png_has_original_size_and_heat_where_the_model_looked(model, ckpt, fullres_dir, tmp_path):
    path = sorted((fullres_dir / "PNEUMONIA").iterdir())[0]
    gray = open_image(path)
    with Image.open(path) as raw:
        assert gray.size == raw.size and gray.size[0] != gray.size[1]
    cam = grad_cam(model, model_input(ckpt, gray))
    out = tmp_path / "heat" / f"{path.stem}.png"
    overlay_png(gray, cam, out)
    assert [p.name for p in out.parent.iterdir()] == [out.name], "temporary file left behind"
    with Image.open(out) as png:
        assert png.format == "PNG" and png.mode == "RGB"
        assert png.size == gray.size
        rgb = np.asarray(png).astype(int)
    # jet is red at the CAM's peak and blue at its minimum: find both back on the original geometry.
    h, w = cam.shape
    for idx, redder in ((cam.argmax(), True), (cam.argmin(), False)):
        r, c = np.unravel_index(idx, cam.shape)
        y, x = int((r + 0.5) * gray.height / h), int((c + 0.5) * gray.width / w)
        red, _, blue = rgb[y, x]
        assert (red > blue) == redder, (r, c, rgb[y, x])


def test_zero_cam_gives_zeros_not_nan(tmp_path):
    model = tiny_model(zero_head=True)
    cam = grad_cam(model, torch.randn(1, 1, 64, 64), target_class=1)
    assert cam.shape == (64, 64) and cam.dtype == np.float32
    assert not cam.any()
    assert np.isnan(central_lung_fraction(cam))
    overlay_png(Image.new("L", (90, 70), 128), cam, tmp_path / "zero.png", cmap="inferno")
    with Image.open(tmp_path / "zero.png") as png:
        assert png.size == (90, 70)


def test_grad_cam_on_a_chosen_layer_and_frozen_parameters():
    model = tiny_model()
    for p in model.parameters():
        p.requires_grad_(False)
    cam = grad_cam(model, torch.randn(1, 1, 64, 64), layer=model.features[-2])
    assert cam.shape == (64, 64) and np.isfinite(cam).all() and 0.0 <= cam.min() <= cam.max() <= 1.0
    assert not any(p.requires_grad or p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("case, match", [
    ("batch_of_two", "one image"),
    ("class_out_of_range", "target_class"),
    ("negative_class", "target_class"),
    ("training_mode", "eval mode"),
    ("layer_not_in_model", "ran 0 times"),
])
def test_grad_cam_rejects_misuse(case, match):
    model, x, kwargs = tiny_model(), torch.randn(1, 1, 32, 32), {}
    if case == "batch_of_two":
        x = torch.randn(2, 1, 32, 32)
    elif case == "class_out_of_range":
        kwargs["target_class"] = 2
    elif case == "negative_class":
        kwargs["target_class"] = -1
    elif case == "training_mode":
        model.train()
    elif case == "layer_not_in_model":
        kwargs["layer"] = torch.nn.Conv2d(1, 1, 1)
    with pytest.raises(ValueError, match=match):
        grad_cam(model, x, **kwargs)
    assert not model.features[-1].pool._forward_pre_hooks


@pytest.mark.parametrize("submodule", ["features.3.bn2", "dropout"])
def test_grad_cam_refuses_a_model_with_one_module_in_training_mode(ckpt, pneumonia_x, submodule):
    """model.eval() then one module's .train() (MC dropout, a half-frozen fine-tune): the forward pass would
    update a BatchNorm's running statistics, changing every later prediction, or drop units at random."""
    model = model_from_checkpoint(ckpt)
    model.get_submodule(submodule).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"{submodule} is in training mode"):
        grad_cam(model, pneumonia_x)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model.features[-1].pool._forward_pre_hooks


def _mass(where: str) -> np.ndarray:
    cam = np.zeros((100, 100), dtype=np.float32)
    if where == "centre":
        cam[50, 50] = 1.0
    elif where == "corner":
        cam[0, 0] = cam[99, 99] = 1.0
    elif where == "uniform":
        cam[:] = 0.3
    elif where == "half_in":
        cam[50, 50] = cam[2, 2] = 1.0
    return cam


@pytest.mark.parametrize("where, expected", [
    ("centre", 1.0),
    ("corner", 0.0),
    ("uniform", (0.85 - 0.15) * (0.90 - 0.15)),
    ("half_in", 0.5),
])
def test_central_lung_fraction(where, expected):
    assert central_lung_fraction(_mass(where)) == pytest.approx(expected)


@pytest.mark.parametrize("box", [
    (0.5, 0.1, 0.4, 0.9), (0.1, 0.1, 1.2, 0.9), (-0.1, 0.0, 0.5, 0.5), (0.2, 0.3, 0.8, 0.3),
])
def test_central_lung_fraction_rejects_bad_boxes(box):
    with pytest.raises(ValueError, match="0 <= x0 < x1 <= 1"):
        central_lung_fraction(np.ones((10, 10)), box)


def test_box_pixels_of_default_box_at_224():
    assert box_pixels((224, 224), CENTRAL_LUNG_BOX) == (34, 34, 202, 190)


@pytest.mark.parametrize("cam, kwargs, match", [
    (np.ones((4, 4, 3)), {}, "2-D"),
    (np.full((4, 4), np.nan), {}, "finite"),
    (np.ones((4, 4)), {"alpha": 1.5}, "alpha"),
    (np.ones((4, 4)), {"cmap": "no_such_map"}, "colormap"),
])
def test_overlay_png_rejects_bad_arguments(cam, kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        overlay_png(Image.new("L", (8, 8)), cam, tmp_path / "x.png", **kwargs)
    assert not any(tmp_path.iterdir())


def test_films_of_one_name_in_two_folders_get_their_own_heatmaps_across_runs(tmp_path):
    films = sorted((Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray" / "train"
                    / "PNEUMONIA").glob("*.jpeg"))[:2]
    if len(films) < 2:
        pytest.skip("real chest X-rays not found")
    for folder, film in zip("ab", films):
        (tmp_path / "in" / folder).mkdir(parents=True)
        (tmp_path / "in" / folder / "x.jpeg").symlink_to(film)
    runs = []
    for i in range(2):  # a second run, as after --resume or on another rank, names each film's heatmap the same
        out = tmp_path / f"r{i}.json"
        assert predict_main(["--image_dir", str(tmp_path / "in"), "--output_path", str(out),
                             "--heatmap_dir", str(tmp_path / "hm")]) == 0
        results = json.loads(out.read_text())["results"]
        runs.append({Path(r["image_path"]).parent.name: r["heatmap_path"] for r in results})
    assert runs[0] == runs[1] and runs[0]["a"] != runs[0]["b"]
    assert len(list((tmp_path / "hm").glob("*.png"))) == 2
    for folder, film in zip("ab", films):  # each overlay has its own film's size
        assert Image.open(runs[0][folder]).size == Image.open(film).size


def test_a_film_refused_or_unreadable_now_keeps_no_heatmap_of_an_earlier_run(tmp_path):
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    film = next(iter(sorted((shared / "chest_xray" / "train" / "PNEUMONIA").glob("*.jpeg"))), None)
    lateral = next(iter(sorted((shared / "dev_shift" / "lateral_chest").glob("*.jpg"))), None)
    if film is None or lateral is None:
        pytest.skip("real chest X-rays or dev_shift not found")
    (tmp_path / "in").mkdir()
    target = tmp_path / "in" / "film.jpeg"
    args = ["--image_dir", str(tmp_path / "in"), "--output_path", str(tmp_path / "r.json"),
            "--heatmap_dir", str(tmp_path / "hm"), "--backend", "torch"]
    for replacement, code in ((lateral, 1), (None, 1)):  # refused as lateral; then unreadable
        target.write_bytes(film.read_bytes())
        assert predict_main(args) == 0
        assert len(list((tmp_path / "hm").glob("film_*_heatmap.png"))) == 1
        target.write_bytes(replacement.read_bytes() if replacement else b"not an image")
        assert predict_main(args) == code
        assert json.loads((tmp_path / "r.json").read_text())["errors"]
        assert not list((tmp_path / "hm").glob("*.png")), "a heatmap stayed under a film that got no answer"


def test_a_film_with_a_long_name_gets_its_heatmap(tmp_path):
    from pneumoscan.inference import heatmap_name

    long_stem = "person1_bacteria_" + "a" * 225  # 242 bytes: a legal name, too long with the heatmap suffix
    name = heatmap_name(tmp_path / f"{long_stem}.jpeg")
    assert len(name.encode()) <= 200 and name.endswith("_heatmap.png") and name.startswith("person1_bacteria_a")
    assert heatmap_name(tmp_path / f"{long_stem}.jpeg") != heatmap_name(tmp_path / f"{long_stem}b.jpeg")
