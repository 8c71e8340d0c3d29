"""config.py: TrainConfig validation, presets and explicit overrides (also through the train CLI)."""

from __future__ import annotations

import dataclasses

import pytest

from pneumoscan import cli
from pneumoscan.config import AUGMENTS, DEVICES, EVAL_METRICS, LOSSES, LR_SCHEDULES, PRESETS, TrainConfig
from pneumoscan.model import ARCHITECTURES
from pneumoscan.preprocess import INTENSITIES

CHOICE_FIELDS = [
    ("arch", "resnet50", tuple(ARCHITECTURES)),
    ("loss", "mse", LOSSES),
    ("augment", "extreme", AUGMENTS),
    ("eval_metric", "accuracy", tuple(EVAL_METRICS)),
    ("device", "tpu", DEVICES),
    ("preset", "slow", tuple(PRESETS)),
    ("lr_schedule", "step", LR_SCHEDULES),
    ("intensity", "clahe", INTENSITIES),
]


@pytest.mark.parametrize(("field", "value", "choices"), CHOICE_FIELDS, ids=[c[0] for c in CHOICE_FIELDS])
def test_unknown_choice_is_refused_naming_the_choices(field, value, choices):
    with pytest.raises(ValueError) as info:
        TrainConfig(**{field: value})
    message = str(info.value)
    assert field in message and repr(value) in message
    for choice in choices:
        assert choice in message, f"{choice!r} missing from {message!r}"


BAD_VALUES = [
    ("epochs", 0, "epochs"),
    ("epochs", -3, "epochs"),
    ("batch_size", 0, "batch_size"),
    ("lr", 0.0, "lr"),
    ("lr", -1e-3, "lr"),
    ("width", 0.0, "width"),
    ("patience", 0, "patience"),
    ("image_size", 0, "image_size"),
    ("image_size", 100, "multiple of 32"),
    ("image_size", 16, "image_size"),
    ("in_channels", 2, "in_channels"),
    ("val_fraction", 0.0, "val_fraction"),
    ("val_fraction", 0.5, "val_fraction"),
    ("dropout", 1.0, "dropout"),
    ("dropout", -0.1, "dropout"),
    ("target_sensitivity", 0.4, "target_sensitivity"),
    ("target_sensitivity", 1.0, "target_sensitivity"),
    ("cv_folds", 1, "cv_folds"),
    ("cv_folds", -2, "cv_folds"),
    ("mixup", -0.2, "mixup"),
    ("fallback_width", -0.25, "fallback_width"),
    ("fallback_width", 1.5, "must not exceed width"),
]


@pytest.mark.parametrize(("field", "value", "words"), BAD_VALUES, ids=[f"{f}={v}" for f, v, _ in BAD_VALUES])
def test_bad_value_is_refused_with_a_message(field, value, words):
    with pytest.raises(ValueError) as info:
        TrainConfig(**{field: value})
    message = str(info.value)
    assert words in message
    assert str(value) in message, f"the bad value {value!r} is not named in {message!r}"


@pytest.mark.parametrize(("field", "value"), [("image_size", 32), ("image_size", 96), ("val_fraction", 0.49),
                                              ("dropout", 0.0), ("target_sensitivity", 0.5), ("in_channels", 1)])
def test_boundary_values_are_accepted(field, value):
    assert getattr(TrainConfig(**{field: value}), field) == value


@pytest.mark.parametrize("fold", [-1, 5])
def test_cv_fold_outside_the_folds_is_refused(fold):
    with pytest.raises(ValueError, match=rf"cv_fold must be in 0\.\.4, got {fold}"):
        TrainConfig(cv_folds=5, cv_fold=fold)
    assert TrainConfig(cv_folds=5, cv_fold=4).cv_fold == 4


@pytest.mark.parametrize("flags", [{"cv_fold": 2}, {"cv_holdout": True}])
def test_fold_flags_without_cv_folds_are_refused(flags):
    with pytest.raises(ValueError, match="need cv_folds >= 2"):
        TrainConfig(**flags)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_values_apply(preset):
    cfg = TrainConfig.from_overrides(preset)
    defaults = TrainConfig()
    assert cfg.preset == preset
    for f in dataclasses.fields(TrainConfig):
        if f.name == "preset":
            continue
        expected = PRESETS[preset].get(f.name, getattr(defaults, f.name))
        assert getattr(cfg, f.name) == expected, f.name


def test_explicit_overrides_win_over_the_preset_and_none_is_ignored():
    fast = PRESETS["fast"]
    assert fast, "the fast preset sets nothing; this test needs it to set something"
    key = "image_size" if "image_size" in fast else next(iter(fast))
    new_value = 64 if key == "image_size" else fast[key]
    cfg = TrainConfig.from_overrides("fast", **{key: new_value}, epochs=None, lr=None, data_dir="d")
    assert getattr(cfg, key) == new_value
    assert cfg.epochs == fast.get("epochs", TrainConfig().epochs)
    assert cfg.lr == fast.get("lr", TrainConfig().lr)
    assert cfg.data_dir == "d"
    cfg = TrainConfig.from_overrides("fast", epochs=3, lr=5e-4)
    assert (cfg.epochs, cfg.lr) == (3, 5e-4)


def test_an_explicit_width_turns_the_fast_presets_fallback_width_off():
    assert TrainConfig.from_overrides("fast").fallback_width == 0.25
    cfg = TrainConfig.from_overrides("fast", width=0.5)
    assert (cfg.width, cfg.fallback_width) == (0.5, 0.0)  # asked for: kept on any machine
    cfg = TrainConfig.from_overrides("fast", width=0.5, fallback_width=0.125)
    assert (cfg.width, cfg.fallback_width) == (0.5, 0.125)  # both asked for: both kept
    assert TrainConfig.from_overrides("fast", width=None).fallback_width == 0.25  # an unset flag is no choice


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError) as info:
        TrainConfig.from_overrides("turbo")
    for name in PRESETS:
        assert name in str(info.value)


def test_overrides_are_validated():
    with pytest.raises(ValueError, match="multiple of 32"):
        TrainConfig.from_overrides("fast", image_size=100)


def test_metric_mode_and_to_dict():
    assert TrainConfig(eval_metric="auroc").metric_mode == "max"
    assert TrainConfig(eval_metric="loss").metric_mode == "min"
    d = TrainConfig(epochs=7).to_dict()
    assert d["epochs"] == 7 and TrainConfig(**d) == TrainConfig(epochs=7)


def _capture_config(monkeypatch):
    import pneumoscan.train

    seen = {}

    def fake_run_training(cfg, given=None):
        seen["cfg"] = cfg
        return {"model_path": "nowhere"}

    monkeypatch.setattr(pneumoscan.train, "run_training", fake_run_training)
    return seen


def test_cli_flags_override_the_preset_and_unset_flags_keep_it(monkeypatch, tmp_path):
    seen = _capture_config(monkeypatch)
    code = cli.train_main(["--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"),
                           "--preset", "fast", "--epochs", "3", "--arch", "medical_cnn_se"])
    assert code == 0
    cfg = seen["cfg"]
    assert (cfg.preset, cfg.epochs, cfg.arch) == ("fast", 3, "medical_cnn_se")
    for key, value in PRESETS["fast"].items():
        if key != "epochs":
            assert getattr(cfg, key) == value, key
    assert cfg.strict is False and cfg.resume is False


def test_cli_rejects_a_bad_value_with_usage_error(monkeypatch, tmp_path, capsys):
    seen = _capture_config(monkeypatch)
    with pytest.raises(SystemExit) as info:
        cli.train_main(["--data_dir", str(tmp_path), "--image_size", "100"])
    assert info.value.code == 2
    assert "multiple of 32" in capsys.readouterr().err
    assert "cfg" not in seen


@pytest.mark.parametrize(("flags", "words"), [
    (["--batch_size", "1"], "batch_size must be >= 2"),
    (["--resume", "--overwrite"], "contradict each other"),
    (["--cv_fold", "0"], "--cv_fold 0 needs --cv_folds"),
    (["--fallback_width", "0.25"], "give --max_train_minutes too"),
    (["--device", "cuda"], "no CUDA GPU"),
    (["--output_dir", "FILE"], "is a file"),
    (["--output_dir", "FILE/out"], "is a file, not a folder"),
])
def test_cli_refuses_contradictory_or_impossible_flags_before_anything_is_written(
        monkeypatch, tmp_path, capsys, flags, words):
    import torch

    if "cuda" in flags and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    seen = _capture_config(monkeypatch)
    (tmp_path / "FILE").write_text("a file")
    flags = [f.replace("FILE", str(tmp_path / "FILE")) for f in flags]
    out = [] if "--output_dir" in flags else ["--output_dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as info:
        cli.train_main(["--data_dir", str(tmp_path), *out, *flags])
    assert info.value.code == 2
    assert words in capsys.readouterr().err
    assert "cfg" not in seen and not (tmp_path / "run").exists()
