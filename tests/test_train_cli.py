"""End to end: ``pneumoscan train`` on a small real subset, --resume, --strict and bad-file listing."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumoscan.checkpoint import load_checkpoint
from pneumoscan.cli import train_main
from pneumoscan.config import TrainConfig
from pneumoscan.data import prepare_data

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]

OUTPUTS = ["medical_cnn_model.pth", "checkpoint_last.pth", "training_results.json", "training_summary.txt",
           "training.log", "history.csv", "training_history.png"]


def read_history(out) -> list[dict]:
    with open(out / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_smoke_run_writes_every_output(trained_run):
    assert trained_run.code == 0
    for name in OUTPUTS:
        path = trained_run.out / name
        assert path.is_file(), f"{name} missing from {trained_run.out}"
        assert path.stat().st_size > 0, f"{name} is empty"
    assert (trained_run.out / "training_history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_log_has_the_per_epoch_line(trained_run):
    log = (trained_run.out / "training.log").read_text()
    lines = [ln for ln in log.splitlines() if "Epoch 1/1" in ln]
    assert len(lines) == 1, log
    line = lines[0]
    for key in ("Train Loss", "Val Sensitivity", "Val Specificity"):
        assert key in line
    loss = float(re.search(r"Train Loss: ([-\d.e+]+|nan)", line).group(1))
    sens = float(re.search(r"Val Sensitivity: ([\d.]+|nan)", line).group(1))
    spec = float(re.search(r"Val Specificity: ([\d.]+|nan)", line).group(1))
    assert math.isfinite(loss) and loss > 0
    assert 0.0 <= sens <= 1.0 and 0.0 <= spec <= 1.0


def test_results_and_history_describe_the_run(trained_run):
    results = json.loads((trained_run.out / "training_results.json").read_text())
    assert results["config"]["image_size"] == 64 and results["config"]["epochs"] == 1
    assert [h["epoch"] for h in results["history"]] == [1]
    assert results["best_epoch"] == 1
    history = read_history(trained_run.out)
    assert [int(r["epoch"]) for r in history] == [1]
    assert float(history[0]["train_loss"]) == pytest.approx(results["history"][0]["train_loss"])
    for column in ("train_loss", "val_loss", "val_sensitivity", "val_specificity", "val_auroc", "lr"):
        assert column in history[0]

    data = results["data"]
    n_files = sum(1 for _ in (trained_run.data / "train").rglob("*.jpeg"))
    assert data["train"]["images"] + data["val"]["images"] + data["duplicates_dropped"] == n_files
    assert data["bad_files"] == 0 and data["bad_file_list"] == []
    for split in ("train", "val"):
        assert data[split]["NORMAL"] > 0 and data[split]["PNEUMONIA"] > 0

    cal = results["calibration"]
    assert cal["temperature"] > 0 and 0.0 < cal["threshold"] < 1.0
    sensitivity = results["validation"]["at_threshold"]["metrics"]["sensitivity"]["value"]
    assert sensitivity >= results["config"]["target_sensitivity"]
    summary = (trained_run.out / "training_summary.txt").read_text()
    assert "validation" in summary and "threshold" in summary


def test_saved_model_is_a_calibrated_checkpoint(trained_run, trained_model):
    ckpt = load_checkpoint(trained_model)
    results = json.loads((trained_run.out / "training_results.json").read_text())
    assert ckpt["input_spec"]["image_size"] == 64 and ckpt["input_spec"]["in_channels"] == 3
    assert ckpt["temperature"] == pytest.approx(results["calibration"]["temperature"])
    assert ckpt["threshold"] == pytest.approx(results["calibration"]["threshold"])
    assert ckpt["input_spec"]["std"] > 0
    last = load_checkpoint(trained_run.out / "checkpoint_last.pth")
    assert last["epoch"] == 1 and "optimizer_state" in last and len(last["history"]) == 1


def test_the_run_split_keeps_patients_apart(trained_run):
    """Rebuild the run's split (same seed, cached decode) and check it against the results file."""
    results = json.loads((trained_run.out / "training_results.json").read_text())
    cfg = results["config"]
    splits = prepare_data(str(trained_run.data), cfg["image_size"], cfg["val_fraction"], cfg["min_val_images"],
                          cfg["seed"], cache_dir=str(trained_run.cache))
    assert not set(splits.train.patients) & set(splits.val.patients)
    assert len(splits.train) == results["data"]["train"]["images"]
    assert len(splits.val) == results["data"]["val"]["images"]
    multi = [p for p in set(splits.train.patients) | set(splits.val.patients)
             if splits.train.patients.count(p) + splits.val.patients.count(p) > 1]
    assert len(multi) >= 3, "the smoke subset should hold patients with several images"


def test_resume_continues_at_epoch_2(trained_run, tmp_path, smoke_args):
    out = tmp_path / "resumed"
    shutil.copytree(trained_run.out, out)
    argv = ["--data_dir", str(trained_run.data), "--output_dir", str(out), "--cache_dir", str(trained_run.cache),
            *smoke_args, "--epochs", "2", "--resume"]
    assert train_main(argv) == 0
    history = read_history(out)
    assert [int(r["epoch"]) for r in history] == [1, 2]
    first = json.loads((trained_run.out / "training_results.json").read_text())["history"][0]
    assert float(history[0]["train_loss"]) == pytest.approx(first["train_loss"])  # epoch 1 kept, not retrained
    results = json.loads((out / "training_results.json").read_text())
    assert len(results["history"]) == 2 and results["config"]["epochs"] == 2
    log = (out / "training.log").read_text()
    assert "resumed" in log and "Epoch 2/2" in log and "Epoch 1/2" not in log
    assert load_checkpoint(out / "checkpoint_last.pth")["epoch"] == 2


def test_resume_without_a_checkpoint_is_refused(trained_run, tmp_path, smoke_args):
    out = tmp_path / "fresh"
    argv = ["--data_dir", str(trained_run.data), "--output_dir", str(out), "--cache_dir", str(trained_run.cache),
            *smoke_args, "--resume"]
    assert train_main(argv) == 2
    log = (out / "training.log").read_text()
    assert "no checkpoint_last.pth" in log and "start without --resume" in log
    assert "data set root" not in log  # refused before any data is prepared


@pytest.mark.parametrize("flag", ["image_size", "init_from", "intensity", "width", "eval_metric", "lr", "loss",
                                  "augment"])
def test_resume_with_a_different_fixed_flag_is_refused(trained_run, tmp_path, smoke_args, flag):
    # init_from is fixed too: the weights on disk expect the normalisation of the run that wrote them;
    # eval_metric too: the best value so far and the restored schedule were measured in the old one;
    # lr: the restored optimiser would ignore it (and the config say it was used); loss, augment: another recipe
    value = {"image_size": "32", "init_from": str(trained_run.model_path), "intensity": "equalize",
             "width": "0.5", "eval_metric": "loss", "lr": "0.0001", "loss": "weighted_ce", "augment": "light"}[flag]
    out = tmp_path / "changed"
    shutil.copytree(trained_run.out, out)
    first_run = len((out / "training.log").read_text())
    argv = ["--data_dir", str(trained_run.data), "--output_dir", str(out), "--cache_dir", str(trained_run.cache),
            *smoke_args, "--epochs", "2", f"--{flag}", value, "--resume"]
    assert train_main(argv) == 2
    log = (out / "training.log").read_text()[first_run:]  # what the refused run wrote
    assert f"cannot --resume with a different {flag}" in log and "Epoch 2/2" not in log
    assert "data set root" not in log  # refused before any data is prepared


def test_a_resumed_run_keeps_its_own_recipe_for_the_flags_not_given_again(trained_run, tmp_path, smoke_args):
    out = tmp_path / "fast_resumed"
    argv = ["--data_dir", str(trained_run.data), "--output_dir", str(out), "--cache_dir", str(trained_run.cache),
            *smoke_args]
    assert train_main([*argv, "--preset", "fast", "--width", "0.25", "--lr_schedule", "plateau", "--augment",
                       "light"]) == 0
    assert train_main([*argv, "--epochs", "2", "--resume"]) == 0  # no --preset, --augment, --lr: the run's own
    config = json.loads((out / "training_results.json").read_text())["config"]
    assert (config["preset"], config["augment"], config["loss"], config["mixup"], config["lr"]) == (
        "fast", "light", "weighted_ce", 0.2, 2e-3)  # before: full's strong augmentation and focal loss from epoch 2
    assert config["epochs"] == 2 and len(read_history(out)) == 2
    first_run = len((out / "training.log").read_text())
    assert train_main([*argv, "--epochs", "3", "--preset", "full", "--resume"]) == 2  # another recipe: refused
    assert "cannot --resume with a different preset: 'fast' -> 'full'" in (out / "training.log").read_text()[first_run:]


def test_a_cosine_run_resumed_with_other_epochs_is_refused(trained_run, tmp_path, smoke_args):
    out = tmp_path / "cosine_resume"
    argv = ["--data_dir", str(trained_run.data), "--output_dir", str(out), "--cache_dir", str(trained_run.cache),
            *smoke_args, "--lr_schedule", "cosine"]
    assert train_main(argv) == 0
    first_run = len((out / "training.log").read_text())
    assert train_main([*argv, "--epochs", "3", "--resume"]) == 2
    log = (out / "training.log").read_text()[first_run:]
    assert "cannot --resume with a different epochs" in log and "Epoch 2/3" not in log


def test_a_run_the_time_budget_stopped_is_finished_on_resume_not_trained_on(trained_run, tmp_path, smoke_args):
    out = tmp_path / "budget"
    argv = ["--data_dir", str(trained_run.data), "--output_dir", str(out), "--cache_dir", str(trained_run.cache),
            *smoke_args, "--epochs", "8", "--max_train_minutes", "0.001"]
    assert train_main(argv) == 0
    assert len(read_history(out)) == 1  # the budget stopped it after the first epoch
    first_run = len((out / "training.log").read_text())
    assert train_main([*argv, "--resume"]) == 0
    log = (out / "training.log").read_text()[first_run:]
    assert "the run had stopped after epoch 1 (time budget" in log and "Epoch 2/8" not in log
    assert len(read_history(out)) == 1
    lowered = [*argv[:-1], "0.0005", "--resume"]  # a lower budget does not continue it either
    assert train_main(lowered) == 0 and len(read_history(out)) == 1
    state = load_checkpoint(out / "checkpoint_last.pth")
    assert state["trained_s"] > 0  # what a raised budget is counted against on the next --resume


def test_the_time_budget_counts_the_training_time_before_a_resume(trained_run, tmp_path, smoke_args):
    from pneumoscan.checkpoint import save_checkpoint

    out = tmp_path / "an_hour_in"
    shutil.copytree(trained_run.out, out)
    state = load_checkpoint(out / "checkpoint_last.pth")
    save_checkpoint({**state, "trained_s": 3600.0}, out / "checkpoint_last.pth")  # an hour trained before
    argv = ["--data_dir", str(trained_run.data), "--output_dir", str(out), "--cache_dir", str(trained_run.cache),
            *smoke_args, "--epochs", "5", "--max_train_minutes", "30", "--resume"]
    assert train_main(argv) == 0
    assert [int(r["epoch"]) for r in read_history(out)] == [1, 2]  # one more epoch, then the 30 minutes are over
    results = json.loads((out / "training_results.json").read_text())
    assert results["stop_reason"].startswith("time budget")


def test_resume_on_other_data_is_refused(trained_run, tmp_path, smoke_args, smoke_files, make_dataset):
    # fewer films: other validation patients, so the best epoch so far was chosen on other films
    other = make_dataset(tmp_path / "other", {cls: paths[:-6] for cls, paths in smoke_files.items()})
    out = tmp_path / "moved"
    shutil.copytree(trained_run.out, out)
    first_run = len((out / "training.log").read_text())
    argv = ["--data_dir", str(other), "--output_dir", str(out), "--cache_dir", str(trained_run.cache),
            *smoke_args, "--epochs", "2", "--resume"]
    assert train_main(argv) == 2
    log = (out / "training.log").read_text()[first_run:]
    assert "its validation patients differ" in log and "Epoch 2/2" not in log


def test_fine_tuning_with_another_split_of_the_same_data_warns(trained_run, tmp_path, smoke_args):
    out = tmp_path / "other_split"
    seed = int(load_checkpoint(trained_run.model_path)["config"]["seed"]) + 1
    argv = ["--data_dir", str(trained_run.data), "--output_dir", str(out), "--cache_dir", str(trained_run.cache),
            *smoke_args, "--init_from", str(trained_run.model_path), "--seed", str(seed), "--lr", "1e-12"]
    assert train_main(argv) == 0
    assert "include patients those weights trained on" in (out / "training.log").read_text()
    same = tmp_path / "same_split"  # the control: the starting run's split gives no warning
    argv = ["--data_dir", str(trained_run.data), "--output_dir", str(same), "--cache_dir", str(trained_run.cache),
            *smoke_args, "--init_from", str(trained_run.model_path), "--lr", "1e-12"]
    assert train_main(argv) == 0
    assert "include patients those weights trained on" not in (same / "training.log").read_text()


@pytest.fixture
def data_with_a_corrupt_file(tmp_path, smoke_files, make_dataset):
    files = {cls: paths[:20] for cls, paths in smoke_files.items()}
    data = make_dataset(tmp_path / "data", files)
    corrupt = data / "train" / "PNEUMONIA" / "person9999_bacteria_1.jpeg"
    corrupt.write_text("not a JPEG at all")
    return data, corrupt


def test_strict_stops_before_training_and_names_the_bad_file(data_with_a_corrupt_file, tmp_path, smoke_args):
    data, corrupt = data_with_a_corrupt_file
    out = tmp_path / "strict_out"
    argv = ["--data_dir", str(data), "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"),
            *smoke_args, "--strict"]
    assert train_main(argv) == 2
    log = (out / "training.log").read_text()
    assert str(corrupt) in log
    assert "Epoch 1/" not in log
    assert not (out / "checkpoint_last.pth").exists() and not (out / "medical_cnn_model.pth").exists()


def test_without_strict_the_bad_file_is_listed(data_with_a_corrupt_file, tmp_path):
    data, corrupt = data_with_a_corrupt_file
    out = tmp_path / "lenient_out"
    # a much smaller model: this run is about the bad-file report, not the network
    argv = ["--data_dir", str(data), "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"),
            "--image_size", "32", "--width", "0.25", "--epochs", "1", "--batch_size", "16",
            "--val_fraction", "0.3", "--device", "cpu"]
    assert train_main(argv) == 0
    results = json.loads((out / "training_results.json").read_text())
    listed = results["data"]["bad_file_list"]
    assert [b["path"] for b in listed] == [str(corrupt)]
    assert "not a recognised image" in listed[0]["reason"]
    assert results["data"]["bad_files"] == 1
    data = results["data"]
    assert data["train"]["images"] + data["val"]["images"] + data["duplicates_dropped"] == 40
    assert "skipped 1 unusable file" in (out / "training_summary.txt").read_text()


def test_missing_data_dir_exits_2(tmp_path, smoke_args):
    out = tmp_path / "out"
    assert train_main(["--data_dir", str(tmp_path / "missing"), "--output_dir", str(out), *smoke_args]) == 2
    assert "does not exist" in (out / "training.log").read_text()


@pytest.mark.parametrize("script", ["train_medical_model.py", "run_inference.py"])
def test_seed_scripts_run(script):
    proc = subprocess.run([sys.executable, str(REPO_ROOT / script), "--help"], capture_output=True, text=True,
                          timeout=120, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    expected_flag = "--data_dir" if script.startswith("train") else "--image_path"
    assert expected_flag in proc.stdout


@pytest.mark.slow
def test_test_split_is_evaluated_once_and_never_trained_on(tmp_path, smoke_files, smoke_args):
    root = tmp_path / "data"
    for cls, paths in smoke_files.items():
        for split, part in (("train", paths[:-8]), ("test", paths[-8:])):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for p in part:
                (root / split / cls / p.name).symlink_to(p)
    out = tmp_path / "out"
    assert train_main(["--data_dir", str(root), "--output_dir", str(out), "--cache_dir", str(tmp_path / "c"),
                       *smoke_args]) == 0
    res = json.loads((out / "training_results.json").read_text())
    assert res["data"]["test"]["images"] == 16
    assert res["test"]["at_threshold"]["n"] == 16
    assert res["test"]["at_threshold"]["threshold"] == pytest.approx(res["calibration"]["threshold"])
    assert "test/ (evaluated once" in (out / "training_summary.txt").read_text()
    log = (out / "training.log").read_text()
    assert log.count("test (evaluated once, never used for choices)") == 1


def test_cosine_schedule_anneals_the_learning_rate_over_the_epochs(trained_run, tmp_path, smoke_args):
    out = tmp_path / "cosine"
    argv = ["--data_dir", str(trained_run.data), "--output_dir", str(out), "--cache_dir", str(trained_run.cache),
            *smoke_args, "--epochs", "3", "--lr_schedule", "cosine", "--lr", "0.001"]
    assert train_main(argv) == 0
    lrs = [float(r["lr"]) for r in read_history(out)]
    eta = 1e-6
    expected = [eta + (1e-3 - eta) * (1 + math.cos(math.pi * e / 3)) / 2 for e in range(3)]
    assert lrs == pytest.approx(expected, rel=1e-6)
    assert json.loads((out / "training_results.json").read_text())["config"]["lr_schedule"] == "cosine"


def test_init_from_fine_tunes_the_given_weights(trained_run, tmp_path, smoke_args):
    out = tmp_path / "fine_tuned"
    argv = ["--data_dir", str(trained_run.data), "--output_dir", str(out), "--cache_dir", str(trained_run.cache),
            *smoke_args, "--init_from", str(trained_run.model_path), "--lr", "1e-12"]
    assert train_main(argv) == 0
    source, tuned = load_checkpoint(trained_run.model_path), load_checkpoint(out / "medical_cnn_model.pth")
    key = "features.0.conv1.weight"
    # a learning rate of 1e-12 leaves the source's weights where they were: they were loaded, not re-initialised
    assert torch.allclose(tuned["model_state"][key], source["model_state"][key], atol=1e-8)
    assert tuned["input_spec"]["mean"] == source["input_spec"]["mean"]  # the normalisation the weights expect
    assert tuned["config"]["init_from"] == str(trained_run.model_path)
    assert "fine-tuning from" in (out / "training.log").read_text()
    # the patients the starting weights were trained on are stored with the model (an ensemble checks them)
    from pneumoscan.data import split_record

    assert tuned["config"]["init_split"] == split_record(source["config"])
    assert tuned["config"]["init_split"]["seed"] == source["config"]["seed"]


def test_freeze_blocks_5_changes_the_head_and_nothing_the_gates_read(trained_run, tmp_path, smoke_args):
    out = tmp_path / "head_only"
    argv = ["--data_dir", str(trained_run.data), "--output_dir", str(out), "--cache_dir", str(trained_run.cache),
            *smoke_args, "--init_from", str(trained_run.model_path), "--freeze_blocks", "5", "--lr", "1e-2"]
    assert train_main(argv) == 0
    source, tuned = load_checkpoint(trained_run.model_path), load_checkpoint(out / "medical_cnn_model.pth")
    blocks = [k for k in source["model_state"] if k.startswith("features.")]
    head = [k for k in source["model_state"] if k.startswith("fc")]
    assert blocks and head
    # convolutions, batch-norm weights and running statistics: bit for bit the source's
    for k in blocks:
        assert torch.equal(tuned["model_state"][k], source["model_state"][k]), k
    assert any(not torch.equal(tuned["model_state"][k], source["model_state"][k]) for k in head)
    assert tuned["config"]["freeze_blocks"] == 5
    assert "classifier head only" in (out / "training.log").read_text()
    # the smoke data's few validation films would refit the gate's limit to about their largest score (about 1 in
    # n + 1 valid films refused): the source's gate, fitted on the same features, is kept
    assert all(torch.equal(a, b) for a, b in zip(tuned["ood_gate"]["means"], source["ood_gate"]["means"]))
    assert (tuned["ood_gate"]["threshold"], tuned["ood_gate"]["scales"]) == (source["ood_gate"]["threshold"],
                                                                          source["ood_gate"]["scales"])
    assert "out-of-scope gate of" in (out / "training.log").read_text()
    assert "note: the out-of-scope gate" not in (out / "training_summary.txt").read_text()


def test_a_gate_fitted_on_few_validation_films_says_what_it_will_refuse(trained_run):
    results = json.loads((trained_run.out / "training_results.json").read_text())
    n = results["data"]["val"]["images"]
    assert n < 200 and f"fitted on only {n} validation films" in results["gate_note"]
    assert f"about 1 in {n + 1}" in (trained_run.out / "training_summary.txt").read_text()


def test_freeze_blocks_4_trains_the_last_block_and_the_head_only(trained_run, tmp_path, smoke_args):
    out = tmp_path / "last_block"
    argv = ["--data_dir", str(trained_run.data), "--output_dir", str(out), "--cache_dir", str(trained_run.cache),
            *smoke_args, "--init_from", str(trained_run.model_path), "--freeze_blocks", "4", "--lr", "1e-2"]
    assert train_main(argv) == 0
    source, tuned = load_checkpoint(trained_run.model_path), load_checkpoint(out / "medical_cnn_model.pth")
    for k, v in source["model_state"].items():
        frozen = any(k.startswith(f"features.{i}.") for i in range(4))
        assert torch.equal(tuned["model_state"][k], v) == frozen or not v.is_floating_point(), k
    assert "convolutional blocks 1-4 frozen" in (out / "training.log").read_text()


def _with_scope_classifier(model_path: Path, out: Path) -> Path:
    """A copy of ``model_path`` with a scope classifier fitted (in the sense of its digest) on its features:
    zero weights over the right inputs, threshold 0, so it accepts every film."""
    from pneumoscan.checkpoint import save_checkpoint
    from pneumoscan.scope import SCOPE_CLASSES, ScopeClassifier, model_digest, pixel_features

    ckpt = load_checkpoint(model_path)
    widths = [ckpt["model_state"][f"features.{i}.conv1.weight"].shape[0] for i in range(5)]
    dim = sum(widths) + pixel_features(np.zeros((1, 8, 8), np.uint8)).shape[1]
    k = len(SCOPE_CLASSES)
    clf = ScopeClassifier(list(SCOPE_CLASSES), torch.zeros(dim), torch.ones(dim), [torch.zeros(k, dim), torch.zeros(k)],
                          0.0, model_digest(ckpt["model_state"]), {"fitted_on": "test"})
    ckpt["scope_classifier"] = clf.to_dict()
    save_checkpoint(ckpt, out)
    return out


def test_freeze_blocks_5_keeps_the_starting_models_scope_classifier(trained_run, tmp_path, smoke_args):
    from pneumoscan.errors import CheckpointError
    from pneumoscan.inference import MedicalImageInference
    from pneumoscan.scope import features_digest

    start = _with_scope_classifier(trained_run.model_path, tmp_path / "with_scope.pth")
    runs = {}
    for frozen in ("5", "4"):
        out = runs[frozen] = tmp_path / f"frozen{frozen}"
        argv = ["--data_dir", str(trained_run.data), "--output_dir", str(out), "--cache_dir", str(trained_run.cache),
                *smoke_args, "--init_from", str(start), "--freeze_blocks", frozen, "--lr", "1e-2"]
        assert train_main(argv) == 0
    source = load_checkpoint(start)
    head_only = load_checkpoint(runs["5"] / "medical_cnn_model.pth")
    kept = head_only["scope_classifier"]
    assert kept is not None and torch.equal(kept["layers"][0], source["scope_classifier"]["layers"][0])
    assert kept["features_digest"] == features_digest(source["model_state"])
    assert kept["info"]["carried_from"] == str(start) and kept["info"]["fitted_on"] == "test"
    assert "scope classifier of" in (runs["5"] / "training.log").read_text()
    MedicalImageInference(runs["5"] / "medical_cnn_model.pth")  # its features are the source's: accepted
    # block 5 trained: the features it read are gone, so is the classifier, with the reason in the log
    assert load_checkpoint(runs["4"] / "medical_cnn_model.pth").get("scope_classifier") is None
    assert "some convolutional blocks are trained" in (runs["4"] / "training.log").read_text()
    # a carried classifier still refuses other convolutional weights
    from pneumoscan.checkpoint import save_checkpoint

    head_only["model_state"]["features.4.conv2.weight"] += 1e-3
    save_checkpoint(head_only, tmp_path / "tampered.pth")
    with pytest.raises(CheckpointError, match="another model"):
        MedicalImageInference(tmp_path / "tampered.pth")


def test_freeze_blocks_without_starting_weights_is_refused(trained_run, tmp_path, smoke_args, capsys):
    argv = ["--data_dir", str(trained_run.data), "--output_dir", str(tmp_path / "x"), *smoke_args,
            "--freeze_blocks", "5"]
    with pytest.raises(SystemExit) as exc:
        train_main(argv)
    assert exc.value.code == 2
    assert "freeze_blocks needs init_from" in capsys.readouterr().err


def test_a_run_that_diverges_ends_with_a_clear_error_not_a_traceback(trained_run, tmp_path, smoke_args, capfd):
    out = tmp_path / "diverged"
    argv = ["--data_dir", str(trained_run.data), "--output_dir", str(out), "--cache_dir", str(trained_run.cache),
            *smoke_args, "--lr", "1e8", "--loss", "ce"]
    assert train_main(argv) == 2
    log = (out / "training.log").read_text()
    assert "lower --lr" in log and "Traceback" not in log + capfd.readouterr().err


def test_a_new_run_into_a_finished_run_s_folder_is_refused_and_its_model_kept(trained_run, tmp_path, smoke_args):
    out = tmp_path / "finished"
    shutil.copytree(trained_run.out, out)
    before = (out / "medical_cnn_model.pth").read_bytes()
    argv = ["--data_dir", str(trained_run.data), "--output_dir", str(out), "--cache_dir", str(trained_run.cache),
            *smoke_args, "--seed", "1"]
    assert train_main(argv) == 2
    assert "holds a run already" in (out / "training.log").read_text()
    assert (out / "medical_cnn_model.pth").read_bytes() == before
    assert train_main([*argv, "--overwrite"]) == 0  # asked for: replaced
    assert load_checkpoint(out / "medical_cnn_model.pth")["config"]["seed"] == 1
    # its log is the new model's alone; the replaced run's (and the refusal) is kept beside it
    log, replaced = (out / "training.log").read_text(), (out / "training.replaced.log").read_text()
    assert log.count("config: ") == 1 and '"seed": 1' in log and "holds a run already" not in log
    assert '"seed": 0' in replaced and "holds a run already" in replaced
    # attempts that fail before training leave the model in place, and the logs before them too
    for _ in range(2):
        assert train_main([*argv, "--overwrite", "--init_from", str(tmp_path / "missing.pth")]) == 2
    assert (out / "training.replaced.log").read_text().startswith(replaced) and '"seed": 1' in (
        out / "training.replaced.log").read_text()


def test_a_model_left_by_a_run_killed_in_its_first_epoch_does_not_block_a_new_run(trained_run, tmp_path, smoke_args):
    out = tmp_path / "killed_early"
    out.mkdir()
    shutil.copy(trained_run.model_path, out / "medical_cnn_model.pth")  # written before checkpoint_last.pth
    argv = ["--data_dir", str(trained_run.data), "--output_dir", str(out), "--cache_dir", str(trained_run.cache),
            *smoke_args]
    assert train_main(argv) == 0
    assert "no checkpoint_last.pth to resume from" in (out / "training.log").read_text()


def test_init_from_another_network_is_refused_with_the_flags_to_give(trained_run, tmp_path, smoke_args):
    out = tmp_path / "mismatch"
    argv = ["--data_dir", str(trained_run.data), "--output_dir", str(out), "--cache_dir", str(trained_run.cache),
            *smoke_args, "--init_from", str(trained_run.model_path), "--width", "0.5"]
    assert train_main(argv) == 2
    log = (out / "training.log").read_text()
    assert "widths" in log and "--width" in log
    assert "Epoch 1/" not in log


def test_init_from_a_missing_file_is_refused(trained_run, tmp_path, smoke_args):
    out = tmp_path / "missing"
    argv = ["--data_dir", str(trained_run.data), "--output_dir", str(out), "--cache_dir", str(trained_run.cache),
            *smoke_args, "--init_from", str(tmp_path / "nope.pth")]
    assert train_main(argv) == 2
    log = (out / "training.log").read_text()
    assert "does not exist; pass --init_from" in log and "--model_path" not in log  # train has no --model_path



def test_intensity_equalize_trains_a_model_that_answers_alike_under_a_contrast_curve(trained_run, tmp_path, smoke_args,
                                                                                     real_jpeg):
    from PIL import Image

    from pneumoscan.inference import MedicalImageInference
    from pneumoscan.preprocess import load_image

    out = tmp_path / "equalized"
    argv = ["--data_dir", str(trained_run.data), "--output_dir", str(out), "--cache_dir", str(trained_run.cache),
            *smoke_args, "--intensity", "equalize"]
    assert train_main(argv) == 0
    ckpt = load_checkpoint(out / "medical_cnn_model.pth")
    assert ckpt["input_spec"]["intensity"] == "equalize"
    # statistics of the equalised inputs: mid-ranks average to 1/2 with the spread of a uniform variable
    assert ckpt["input_spec"]["mean"] == pytest.approx(0.5, abs=1e-3)
    assert ckpt["input_spec"]["std"] == pytest.approx(12 ** -0.5, abs=0.01)
    assert ckpt["format_version"] == 3  # an older pneumoscan, which cannot equalise, refuses it
    # one real film at the model's size (no resize), and the same film through a gamma curve that merges no level
    coarse = load_image(real_jpeg, 64) // 2
    curve = np.round(255.0 * (np.arange(128) / 127.0) ** 0.6).astype(np.uint8)
    files = [tmp_path / "film.png", tmp_path / "film_gamma.png"]
    for arr, f in zip((coarse, curve[coarse]), files):
        Image.fromarray(arr).save(f)

    def probabilities(model_path) -> list[float]:
        engine = MedicalImageInference(model_path, device="cpu", backend="torch", gate=False)
        return [r.probabilities["PNEUMONIA"] for r in engine.predict_batch(files)]

    p_eq, p_raw = probabilities(out / "medical_cnn_model.pth"), probabilities(trained_run.model_path)
    assert p_eq[0] == pytest.approx(p_eq[1], abs=1e-9)
    assert abs(p_raw[0] - p_raw[1]) > 1e-4  # the raw model's answer moves with the curve


def test_init_from_a_model_with_other_grey_levels_is_refused(trained_run, tmp_path, smoke_args):
    out = tmp_path / "other_levels"
    argv = ["--data_dir", str(trained_run.data), "--output_dir", str(out), "--cache_dir", str(trained_run.cache),
            *smoke_args, "--init_from", str(trained_run.model_path), "--intensity", "equalize"]
    assert train_main(argv) == 2
    log = (out / "training.log").read_text()
    assert "--intensity raw" in log and "Epoch 1/" not in log


def test_mixup_trains_on_mixed_batches(trained_run, tmp_path, smoke_args):
    out = tmp_path / "mixup"
    argv = ["--data_dir", str(trained_run.data), "--output_dir", str(out), "--cache_dir", str(trained_run.cache),
            *smoke_args, "--mixup", "0.4"]
    assert train_main(argv) == 0
    assert json.loads((out / "training_results.json").read_text())["config"]["mixup"] == 0.4
    # the same seed, data and schedule without mixup gave another training loss
    loss, plain = (float(read_history(d)[0]["train_loss"]) for d in (out, trained_run.out))
    assert math.isfinite(loss) and loss != pytest.approx(plain, rel=1e-6)


def test_a_time_budget_ends_the_cosine_schedule_where_the_run_will_stop():
    from pneumoscan.train import last_epoch_in_budget

    # 2.9 min per epoch against 8 minutes: after epoch 1 (2.9 min) one more fits, so the run stops at 2
    assert last_epoch_in_budget(1, 2.9, 2.9, 8.0) == 2
    assert last_epoch_in_budget(2, 5.8, 2.9, 8.0) == 2  # the run's own stop rule: another would pass 8
    assert last_epoch_in_budget(1, 1.1, 1.1, 8.0) == 7 and last_epoch_in_budget(3, 9.0, 3.0, 8.0) == 3
    # a cosine schedule whose end moves to that epoch reaches its floor there, from where it was
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6, eta_min=1e-6)
    opt.step()
    sched.T_max = 2
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx((2e-3 + 1e-6) / 2)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-6)
    assert sched.state_dict()["T_max"] == 2  # kept by checkpoint_last.pth for --resume


def test_a_short_time_budget_shortens_the_cosine_schedule(trained_run, tmp_path, smoke_args):
    out = tmp_path / "budget"
    # a budget of a few smoke epochs, with 50 planned: the cosine must end at the epoch the budget stops at
    argv = ["--data_dir", str(trained_run.data), "--output_dir", str(out), "--cache_dir", str(trained_run.cache),
            *smoke_args, "--epochs", "50", "--lr_schedule", "cosine", "--lr", "0.001", "--max_train_minutes", "0.25"]
    assert train_main(argv) == 0
    history = read_history(out)
    log = (out / "training.log").read_text()
    assert "time budget" in log and len(history) < 50
    if len(history) >= 3:  # one epoch of annealing seen: the last LR is far below an unshortened schedule's
        unshortened = 1e-6 + (1e-3 - 1e-6) * (1 + math.cos(math.pi * (len(history) - 1) / 50)) / 2
        assert float(history[-1]["lr"]) < 0.8 * unshortened
        assert "the cosine schedule now ends at epoch" in log


def test_a_slow_machine_trains_the_fallback_width_says_so_and_resumes_at_it(trained_run, tmp_path, smoke_args):
    from pneumoscan.model import build_model

    out = tmp_path / "fallback"
    # a budget no epoch fits in: the speed check must choose the fallback width before training
    argv = ["--data_dir", str(trained_run.data), "--output_dir", str(out), "--cache_dir", str(trained_run.cache),
            *smoke_args, "--epochs", "2", "--fallback_width", "0.25", "--max_train_minutes", "0.0001"]
    assert train_main(argv) == 0
    results = json.loads((out / "training_results.json").read_text())
    assert results["config"]["width"] == 0.25 and results["width_check"]["width_checked"] == 1.0
    assert results["width_check"]["epochs_that_fit"] == 0
    ckpt = load_checkpoint(out / "medical_cnn_model.pth")
    narrow = build_model(TrainConfig(width=0.25))
    assert {k: v.shape for k, v in ckpt["model_state"].items()} == {k: v.shape for k, v in narrow.state_dict().items()}
    assert "width x0.25, not x1.0" in (out / "training_summary.txt").read_text()
    assert "speed check" in (out / "training.log").read_text()
    assert len(read_history(out)) == 1  # the same budget stopped it after one epoch
    # --resume continues at the width the first run chose, even with a budget where a new speed check
    # would keep width 1.0 (600 minutes), and does not time the machine again
    resumed = [*argv[:-1], "600", "--resume"]
    assert train_main(resumed) == 0
    log = (out / "training.log").read_text()
    assert "continuing at width 0.25" in log and log.count("speed check (") == 1
    assert [int(r["epoch"]) for r in read_history(out)] == [1, 2]
    results = json.loads((out / "training_results.json").read_text())
    assert results["config"]["width"] == 0.25 and results["width_check"]["resumed"] is True
    assert "kept from the run it resumed" in (out / "training_summary.txt").read_text()


def test_where_the_epochs_fit_the_speed_check_changes_nothing(trained_run, tmp_path, smoke_args):
    out = tmp_path / "fits"
    argv = ["--data_dir", str(trained_run.data), "--output_dir", str(out), "--cache_dir", str(trained_run.cache),
            *smoke_args, "--fallback_width", "0.25", "--max_train_minutes", "600"]
    assert train_main(argv) == 0
    results = json.loads((out / "training_results.json").read_text())
    assert results["width_check"]["width"] == results["config"]["width"] == 1.0
    # the probe drew nothing the run would have drawn: the same weights as the plain smoke run
    checked, plain = (load_checkpoint(d / "medical_cnn_model.pth")["model_state"] for d in (out, trained_run.out))
    assert checked.keys() == plain.keys()
    assert all(torch.equal(checked[k], plain[k]) for k in plain)


def test_validation_outputs_that_are_not_finite_stop_training_with_a_clear_error(trained_run):
    """Weights that overflowed while the training loss still looked finite: before, the metrics raised a bare
    ValueError out of the training loop (a traceback, no results)."""
    from pneumoscan.data import split_from_config
    from pneumoscan.errors import TrainingError
    from pneumoscan.train import build_trainer, validate

    ckpt = load_checkpoint(trained_run.model_path)
    cfg = TrainConfig(**{**ckpt["config"], "device": "cpu"})
    splits = split_from_config(ckpt["config"], str(trained_run.data), cfg.image_size, str(trained_run.cache))
    tr = build_trainer(cfg, splits, torch.device("cpu"))
    tr.model.load_state_dict({**ckpt["model_state"], "fc2.bias": torch.tensor([0.0, float("inf")])})
    with pytest.raises(TrainingError, match=f"outputs on {len(splits.val)} of {len(splits.val)} validation films "
                                            "are not finite.*lower --lr"):
        validate(tr, splits.val)
