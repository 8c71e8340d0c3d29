"""Patient-level k-fold cross-validation end to end on real films: ``pneumoscan train --cv_folds``
(every fold by the ordinary trainer, restartable, out-of-fold report, the calibrated ensemble) and
experiments/kfold_eval.py on its runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumoscan.calibration import positive_probability
from pneumoscan.checkpoint import load_checkpoint, save_checkpoint
from pneumoscan.cli import train_main
from pneumoscan.data import prepare_data, split_from_config
from pneumoscan.inference import MedicalImageInference

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory, smoke_data, smoke_args) -> Path:
    out = tmp_path_factory.mktemp("cv") / "run"
    argv = ["--data_dir", str(smoke_data), "--output_dir", str(out), "--cache_dir", str(out.parent / "cache"),
            "--cv_folds", "2", "--cv_holdout", "--augment", "acquisition", "--width", "0.25", *smoke_args]
    assert train_main(argv) == 0
    assert train_main(argv) == 0  # started again: finished folds are skipped, the report is rebuilt
    assert (out / "training.log").read_text().count("finished earlier") == 2
    return out


@pytest.fixture(scope="module")
def fewer_films(tmp_path_factory, smoke_files, make_dataset) -> Path:
    """The smoke data less a few films of each class: folds made of it hold other patients."""
    return make_dataset(tmp_path_factory.mktemp("fewer") / "data", {c: p[:-8] for c, p in smoke_files.items()})


def _cv_argv(cv_run: Path, data: Path, out: Path, smoke_args: list[str]) -> list[str]:
    """cv_run's command line, into ``out`` on ``data``."""
    return ["--data_dir", str(data), "--output_dir", str(out), "--cache_dir", str(cv_run.parent / "cache"),
            "--cv_folds", "2", "--cv_holdout", "--augment", "acquisition", "--width", "0.25", *smoke_args]


@pytest.mark.parametrize("flag, value", [("--cv_folds", "3"), ("--augment", "strong"), ("--dropout", "0.2"),
                                         ("--batch_size", "8"), ("--patience", "3"), ("--data_dir", "fewer"),
                                         ("--width", "0.5")])
def test_finished_folds_of_other_settings_are_not_reused(cv_run, smoke_data, smoke_args, tmp_path, flag, value,
                                                         fewer_films):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(cv_run, out)
    argv = _cv_argv(cv_run, smoke_data, out, smoke_args)
    if flag in argv:
        argv[argv.index(flag) + 1] = str(fewer_films) if value == "fewer" else value
    else:
        argv += [flag, value]
    first_run = len((out / "training.log").read_text())
    assert train_main(argv) == 2
    log = (out / "training.log").read_text()[first_run:]
    assert "holds a fold trained with other settings" in log and flag.lstrip("-") in log
    assert "Epoch 1/" not in log


def test_a_finished_fold_is_reused_whatever_the_spelling_of_its_data_folder(cv_run, smoke_data, smoke_args,
                                                                          tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(cv_run, out)
    monkeypatch.chdir(smoke_data.parent)
    argv = _cv_argv(cv_run, smoke_data, out, smoke_args)
    argv[1] = f"./{smoke_data.name}/"
    assert train_main([*argv, "--resume"]) == 0  # --resume on a k-fold run: its finished folds are skipped too
    assert (out / "training.log").read_text().count("finished earlier") == 4


def test_resume_of_a_k_fold_run_keeps_its_own_recipe_for_the_flags_not_given_again(cv_run, smoke_data, tmp_path):
    """``--resume --cv_folds 2`` alone (no --augment, --width, --cv_holdout, --image_size, --epochs...): the folds
    are the run's, so they are reused, not refused as trained with other settings, and the report is the run's."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(cv_run, out)
    (out / "cv_results.json").unlink()
    (out / "medical_cnn_model.pth").unlink()
    argv = ["--data_dir", str(smoke_data), "--output_dir", str(out), "--cache_dir", str(cv_run.parent / "cache"),
            "--cv_folds", "2", "--device", "cpu", "--resume"]
    assert train_main(argv) == 0
    log = (out / "training.log").read_text()
    assert log.count("finished earlier") == 4 and "recipe is read from" in log
    config = json.loads((out / "cv_results.json").read_text())["config"]
    before = json.loads((cv_run / "cv_results.json").read_text())["config"]
    assert {k: config[k] for k in ("augment", "width", "cv_holdout", "image_size", "epochs", "batch_size")} == \
        {k: before[k] for k in ("augment", "width", "cv_holdout", "image_size", "epochs", "batch_size")}
    assert (out / "medical_cnn_model.pth").is_file()  # --cv_holdout, the run's own: the ensemble is written again
    # a flag given again with another value is still refused
    assert train_main([*argv, "--augment", "strong"]) == 2
    assert "holds a fold trained with other settings" in (out / "training.log").read_text()


def test_resume_of_a_k_fold_folder_without_cv_folds_or_of_one_with_no_fold_says_what_to_give(cv_run, smoke_data,
                                                                                            tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(cv_run, out)
    assert train_main(["--data_dir", str(smoke_data), "--output_dir", str(out), "--resume"]) == 2
    assert "holds a k-fold run" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train_main(["--data_dir", str(smoke_data), "--output_dir", str(empty), "--cv_folds", "2",
                       "--resume"]) == 2
    assert "holds no started fold of a 2-fold run" in capsys.readouterr().err


def test_fold_models_are_refused_on_a_data_folder_whose_folds_hold_other_patients(cv_run, fewer_films):
    from pneumoscan.cv import collect_oof
    from pneumoscan.errors import CheckpointError

    folds = [cv_run / f"fold{i}" / "medical_cnn_model.pth" for i in (0, 1)]
    with pytest.raises(CheckpointError, match=r"fold0.*\(fold 0\) was validated on other patients.*--overwrite"):
        collect_oof(folds, str(fewer_films), str(cv_run.parent / "cache"))


def test_a_finished_fold_is_refused_before_the_others_train_when_its_folder_s_films_changed(cv_run, smoke_files,
                                                                                             make_dataset, smoke_args,
                                                                                             tmp_path):
    import shutil

    data = make_dataset(tmp_path / "data", smoke_files)  # the same films as the fold trained on, at a new path
    out = tmp_path / "run"
    (out / "fold0").mkdir(parents=True)
    for f in (cv_run / "fold0").iterdir():
        if f.is_file():
            shutil.copy(f, out / "fold0" / f.name)
    results = out / "fold0" / "training_results.json"
    done = json.loads(results.read_text())
    done["config"]["data_dir"] = str(data)  # as if it had been trained on this folder
    results.write_text(json.dumps(done))
    for cls, paths in smoke_files.items():  # then films were removed: the same path, other patients in fold 0
        for p in paths[-8:]:
            (data / "train" / cls / p.name).unlink()
    assert train_main(_cv_argv(cv_run, data, out, smoke_args)) == 2
    assert "fold0 (fold 0) was validated on other patients" in (out / "training.log").read_text()
    assert not (out / "fold1").exists()  # refused before any other fold trained


def test_an_ensemble_of_folds_is_refused_on_a_data_folder_whose_folds_hold_other_patients(cv_run, smoke_data,
                                                                                          fewer_films, tmp_path,
                                                                                          capsys):
    from pneumoscan.cli import EXIT_BAD_INPUT, EXIT_OK, main

    folds = [str(cv_run / f"fold{i}" / "medical_cnn_model.pth") for i in (0, 1)]
    cache = ["--cache_dir", str(cv_run.parent / "cache")]
    wrong = main(["ensemble", "--members", *folds, "--data_dir", str(fewer_films), "--output_path",
                  str(tmp_path / "wrong.pth"), *cache])
    assert wrong == EXIT_BAD_INPUT and "member 0 (fold 0) was validated on other patients" in capsys.readouterr().err
    assert not (tmp_path / "wrong.pth").exists()
    # on the folder they trained on, the folds' held-out patients calibrate them, as run_cv does
    right = main(["ensemble", "--members", *folds, "--data_dir", str(smoke_data), "--output_path",
                  str(tmp_path / "right.pth"), *cache])
    assert right == EXIT_OK
    assert load_checkpoint(tmp_path / "right.pth")["threshold"] == pytest.approx(
        load_checkpoint(cv_run / "medical_cnn_model.pth")["threshold"])


def test_a_k_fold_run_into_a_plain_run_s_folder_is_refused_and_its_model_kept(cv_run, trained_run, smoke_args,
                                                                             tmp_path):
    import shutil

    out = tmp_path / "plain"
    shutil.copytree(trained_run.out, out)
    before = (out / "medical_cnn_model.pth").read_bytes()
    for extra in ([], ["--resume"]):
        assert train_main([*_cv_argv(cv_run, trained_run.data, out, smoke_args), *extra]) == 2
    log = (out / "training.log").read_text()
    assert log.count("holds a plain training run (checkpoint_last.pth, training_results.json)") == 2
    assert "--overwrite" in log and "fold 0 of 2" not in log
    assert (out / "medical_cnn_model.pth").read_bytes() == before and not (out / "fold0").exists()


def test_a_plain_run_into_a_k_fold_run_s_folder_is_refused_and_its_ensemble_kept(cv_run, trained_run, smoke_args,
                                                                                tmp_path):
    import shutil

    out = tmp_path / "cv"
    shutil.copytree(cv_run, out)
    before = (out / "medical_cnn_model.pth").read_bytes()
    argv = ["--data_dir", str(trained_run.data), "--output_dir", str(out), "--cache_dir", str(trained_run.cache),
            *smoke_args]
    assert train_main(argv) == 2
    assert "holds a k-fold run (cv_results.json)" in (out / "training.log").read_text()
    assert (out / "medical_cnn_model.pth").read_bytes() == before


def test_overwrite_makes_a_plain_run_s_folder_a_k_fold_run_s(trained_run, tmp_path):
    import shutil

    from pneumoscan.cv import claim_folder
    from pneumoscan.errors import CheckpointError
    from pneumoscan.train import refuse_existing_run

    out = tmp_path / "plain"
    shutil.copytree(trained_run.out, out)
    with pytest.raises(CheckpointError, match="plain training run"):
        claim_folder(out, overwrite=False)
    claim_folder(out, overwrite=True)
    assert not any((out / n).exists() for n in ("checkpoint_last.pth", "training_results.json",
                                                 "medical_cnn_model.pth"))
    refuse_existing_run(out, k_fold=True)  # a later start (without --overwrite) reads it as the k-fold run's


def test_folds_validate_on_disjoint_patients_that_cover_all_but_the_held_out(cv_run):
    n_val, patients = 0, 0
    for fold in (0, 1):
        res = json.loads((cv_run / f"fold{fold}" / "training_results.json").read_text())
        assert (res["config"]["cv_folds"], res["config"]["cv_fold"], res["config"]["cv_holdout"]) == (2, fold, True)
        assert res["config"]["augment"] == "acquisition"
        assert res["data"]["validation"].startswith(f"fold {fold} of 2 patient-level folds")
        assert "held out" in res["data"]["validation"]
        n_val += res["data"]["val"]["images"]
        patients += res["data"]["val"]["patients"]
    assert n_val == res["data"]["train"]["images"] + res["data"]["val"]["images"]  # each film validated once
    report = json.loads((cv_run / "cv_results.json").read_text())
    oof = report["oof"]
    assert oof["n"] == n_val and oof["patients"] == patients and oof["normal"] + oof["pneumonia"] == n_val
    assert 0.0 <= oof["auroc"]["ci_low"] <= oof["auroc"]["value"] <= oof["auroc"]["ci_high"] <= 1.0
    assert oof["at_oof_threshold"]["sensitivity"]["value"] >= 0.95  # the OOF threshold on its own films
    assert 0.0 <= oof["cross_validated"]["ece"] <= 1.0 and [f["fold"] for f in oof["per_fold"]] == [0, 1]
    summary = (cv_run / "cv_summary.txt").read_text()
    assert "2-fold cross-validation by patient" in summary and "cross-validated operating point" in summary
    assert report["fold_widths"] == [0.25, 0.25] and report["mixed_widths"] is None and "differ" not in summary


def test_fold_models_of_different_widths_are_named_in_the_report(cv_run):
    from pneumoscan.cv import mixed_widths

    widths = [load_checkpoint(cv_run / f"fold{i}" / "medical_cnn_model.pth")["config"]["width"] for i in (0, 1)]
    assert mixed_widths(widths) is None
    widths[1] = 0.5  # as if the second fold's speed check had found time for half width
    note = mixed_widths(widths)
    assert "x0.25, x0.5" in note and "--width" in note


def test_the_ensemble_is_calibrated_on_held_out_patients_and_predicts(cv_run, smoke_data, fullres_dir):
    report = json.loads((cv_run / "cv_results.json").read_text())
    held = report["ensemble_holdout"]
    ckpt = load_checkpoint(cv_run / "medical_cnn_model.pth")
    assert ckpt["arch"] == "ensemble" and len(ckpt["model_kwargs"]["ensemble"]) == 2
    assert ckpt["temperature"] == pytest.approx(held["temperature"])
    assert ckpt["threshold"] == pytest.approx(held["threshold"]) and ckpt["ood_gate"] is not None
    assert held["validation"]["at_threshold"]["metrics"]["sensitivity"]["value"] >= 0.95
    usual = prepare_data(str(smoke_data), 64, seed=ckpt["config"]["seed"], cache_dir=str(cv_run.parent / "cache"))
    assert held["n"] == len(usual.val) and held["n"] + report["oof"]["n"] == len(usual.train) + len(usual.val)
    # later tools (recalibrate, fit_scope, evaluate) find the held-out patients as the model's own split
    own = split_from_config(ckpt["config"], str(smoke_data), 64, str(cv_run.parent / "cache"))
    assert own.val.paths == usual.val.paths and ckpt["config"]["ensemble_of"]["folds"] == [0, 1]
    engine = MedicalImageInference(str(cv_run / "medical_cnn_model.pth"), device="cpu")
    result = engine.predict_image(str(next((fullres_dir / "PNEUMONIA").iterdir())))
    assert result.prediction in ("NORMAL", "PNEUMONIA")
    assert sum(result.probabilities.values()) == pytest.approx(1.0)


def test_the_ensemble_s_held_out_operating_point_is_reported_in_and_out_of_sample(cv_run, smoke_data):
    """The summary gave the ensemble's sensitivity and specificity at its threshold on the held-out films as if
    they were those of new patients; that threshold was chosen on those very films. It says so now, and gives the
    operating point cross-validated over groups of the held-out patients."""
    from pneumoscan.cv import OutOfFold, cross_fitted, deal_patients, operating_point
    from pneumoscan.predict import Predictor

    held = json.loads((cv_run / "cv_results.json").read_text())["ensemble_holdout"]
    ckpt = load_checkpoint(cv_run / "medical_cnn_model.pth")
    val = split_from_config(ckpt["config"], str(smoke_data), 64, str(cv_run.parent / "cache")).val
    oof = OutOfFold(Predictor.from_checkpoint(ckpt).logits(val.images), val.labels, list(val.patients),
                    deal_patients(list(val.patients), 5, val.labels.numpy()))
    by_hand = operating_point(val.labels.numpy(), *cross_fitted(oof, 0.95, if_separable=(None, 0.0))[:2])
    assert held["cross_validated"] == pytest.approx({**by_hand, "folds": 5})
    summary = (cv_run / "cv_summary.txt").read_text()
    assert "(threshold chosen on these films); ECE" in summary
    assert (f"cross-validated over 5 groups of the held-out patients (fitted on the others): sensitivity "
            f"{by_hand['sensitivity']:.4f}, specificity {by_hand['specificity']:.4f}") in summary


def test_kfold_eval_reports_shift_proxies_and_writes_the_same_ensemble(cv_run, smoke_data, tmp_path):
    report_path, ens_path = tmp_path / "cv.json", tmp_path / "ens.pth"
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "kfold_eval.py"), "--data_dir", str(smoke_data),
                           "--runs", str(cv_run), "--json", str(report_path), "--adult_dir", "none",
                           "--write_ensemble", str(ens_path), "--cache_dir", str(cv_run.parent / "cache")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(report_path.read_text())
    cli_report = json.loads((cv_run / "cv_results.json").read_text())
    assert report["members"] == 2 and report["oof"]["auroc"] == cli_report["oof"]["auroc"]
    assert set(report["stress_auroc"]) == set(report["ensemble_holdout"]["stress_auroc"]) == {
        "hist_eq", "jpeg_q10", "lowres_25"}
    assert load_checkpoint(ens_path)["threshold"] == pytest.approx(cli_report["ensemble_holdout"]["threshold"])
    held = report["stress_at_plain_operating_point"]
    assert set(held) == set(report["stress_auroc"])
    assert all(0.0 <= m[k] <= 1.0 for m in held.values() for k in ("sensitivity", "specificity", "accuracy", "ece"))


def _oof(logit_gap: float, n: int = 60):
    """Synthetic OOF logits of n films in 3 folds: pneumonias score logit_gap higher, with noise."""
    import numpy as np
    import torch

    from pneumoscan.cv import OutOfFold

    rng = np.random.default_rng(0)
    y = np.arange(n) % 2
    z = rng.normal(size=n) + logit_gap * y
    logits = torch.tensor(np.stack([-z / 2, z / 2], axis=1), dtype=torch.float32)
    return OutOfFold(logits, torch.tensor(y), [f"p{i}" for i in range(n)], np.arange(n) % 3)


def test_cross_fitted_operating_point_applied_to_changed_films():
    import numpy as np

    from pneumoscan.cv import cross_fitted, oof_report, operating_point

    oof = _oof(3.0)
    prob, pred, params = cross_fitted(oof)
    again = cross_fitted(oof, applied_to=oof.logits.clone())
    assert np.array_equal(prob, again[0]) and np.array_equal(pred, again[1]) and [p[0] for p in params] == [0, 1, 2]
    y = oof.labels.numpy()
    assert operating_point(y, prob, pred) == oof_report(oof)["cross_validated"]
    # by hand for fold 0: temperature and threshold from folds 1-2 only, applied to fold 0's changed rows
    import torch

    from pneumoscan.calibration import fit_temperature, positive_probability
    from pneumoscan.metrics import threshold_for_sensitivity

    changed = oof.logits * torch.linspace(0.5, 1.5, len(y))[:, None]  # a different change for every row
    fit, held = oof.folds != 0, oof.folds == 0
    t = fit_temperature(oof.logits[fit], oof.labels[fit])
    thr = threshold_for_sensitivity(y[fit], positive_probability(oof.logits[fit], t), 0.95)
    p_changed, c_changed, _ = cross_fitted(oof, applied_to=changed)
    assert np.allclose(p_changed[held], positive_probability(changed[held], t))
    assert np.array_equal(c_changed[held], positive_probability(changed[held], t) >= thr)
    # every film pushed towards PNEUMONIA, as a shift that the stored calibration did not see: the
    # operating point fitted on the plain films now calls every normal PNEUMONIA
    shifted = oof.logits + oof.logits.new_tensor([-10.0, 10.0])
    moved = operating_point(y, *cross_fitted(oof, applied_to=shifted)[:2])
    assert moved["sensitivity"] == 1.0 and moved["specificity"] == 0.0 and moved["ece"] > 0.4
    with pytest.raises(ValueError, match="rows"):
        cross_fitted(oof, applied_to=oof.logits[:-1])


def test_the_first_folds_speed_check_decides_every_folds_width(tmp_path, smoke_data, smoke_args):
    out = tmp_path / "cv"
    # a budget no epoch fits in: fold 0 falls back to width 0.25; fold 1 must follow it without a check
    argv = ["--data_dir", str(smoke_data), "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"),
            "--cv_folds", "2", "--fallback_width", "0.25", "--max_train_minutes", "0.0001", *smoke_args]
    assert train_main(argv) == 0
    widths = [json.loads((out / f"fold{i}" / "training_results.json").read_text())["config"]["width"] for i in (0, 1)]
    assert widths == [0.25, 0.25]
    log = (out / "training.log").read_text()
    assert log.count("speed check (") == 1 and "the other folds train at width 0.25 too" in log
    report = json.loads((out / "cv_results.json").read_text())
    assert report["fold_widths"] == [0.25, 0.25] and report["mixed_widths"] is None
    assert "fold models at width x0.25, not x1.0" in (out / "cv_summary.txt").read_text()


def test_a_temperature_is_not_fitted_on_films_the_model_already_separates():
    from pneumoscan.calibration import fit_calibrated_point, separable

    z = torch.tensor([-3.0, -1.0, -0.5, 0.4, 2.0, 5.0])
    logits = torch.stack([torch.zeros_like(z), z], 1)
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    assert separable(logits, y) and separable(logits, y, intercept=True)
    assert fit_calibrated_point(logits, y, 0.95)[0] == 0.05  # no finite optimum: the fit runs to its bound
    t, thr, b = fit_calibrated_point(logits, y, 0.95, if_separable=(0.7, 0.0))
    assert (t, b) == (0.7, 0.0) and 0 < thr < 1
    # one film on the wrong side of 0, but every normal below every pneumonia: an intercept still has no optimum
    shifted = torch.stack([torch.zeros_like(z), z + 1.0], 1)
    assert not separable(shifted, y) and separable(shifted, y, intercept=True)
    assert fit_calibrated_point(shifted, y, 0.95, if_separable=(0.7, 0.0))[0] != 0.7


def test_the_cross_fitted_ece_measures_the_calibration_that_ships_on_separable_films():
    from pneumoscan.calibration import cross_fitted_ece, separable
    from pneumoscan.metrics import expected_calibration_error

    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(100), np.ones(100)].astype(int)
    z = np.where(y == 1, 1.0, -1.0) * rng.uniform(0.05, 2, 200)  # every film on the right side of z = 0
    logits = torch.tensor(np.stack([np.zeros(200), z], 1), dtype=torch.float32)
    labels = torch.tensor(y)
    assert separable(logits, labels)
    raw = expected_calibration_error(y, positive_probability(logits))  # no temperature: what training ships
    crossed = cross_fitted_ece(logits, labels, [f"p{i}" for i in range(200)])
    assert raw > 0.2 and crossed > 0.2  # before, a temperature at its 0.05 bound was measured: ECE 0.01


def test_training_on_films_the_model_separates_ships_no_temperature_and_says_uncalibrated(fullres_dir, tmp_path):
    """The shipped model on films it trained on: every one on the right side of its margin, so calibration there
    has no finite optimum; the model must then be stored, and answer, as uncalibrated (it said calibrated, T = 1)."""
    from pneumoscan.checkpoint import default_model_path
    from pneumoscan.config import TrainConfig
    from pneumoscan.data import DataSplits, ImageSet
    from pneumoscan.predict import Predictor
    from pneumoscan.preprocess import load_image
    from pneumoscan.train import finalize

    ckpt = load_checkpoint(default_model_path())
    size = ckpt["input_spec"]["image_size"]
    paths = [p for cls in ("NORMAL", "PNEUMONIA") for p in sorted((fullres_dir / cls).iterdir())[:12]]
    labels = torch.tensor([int(p.parent.name == "PNEUMONIA") for p in paths])
    images = torch.from_numpy(np.stack([load_image(p, size) for p in paths]))
    predictor = Predictor.from_checkpoint(ckpt)
    z = predictor.logits(images)
    right = ((z[:, 1] > z[:, 0]).long() == labels).nonzero().flatten().tolist()
    val = ImageSet(images[right], labels[right], [str(paths[i]) for i in right], [f"p{i}" for i in right])
    assert set(val.labels.tolist()) == {0, 1}
    train = ImageSet(images, labels, [str(p) for p in paths], [f"p{i}" for i in range(len(paths))])
    final = finalize(predictor, DataSplits(train, val, None), TrainConfig())
    assert final["temperature"] is None and 0 < final["threshold"] < 1
    path = tmp_path / "separable.pth"
    save_checkpoint({**ckpt, "temperature": None, "threshold": final["threshold"]}, path)
    result = MedicalImageInference(str(path), device="cpu", backend="torch").predict_image(val.paths[0])
    assert result.calibrated is False and any("uncalibrated" in w for w in result.warnings)


def test_out_of_fold_films_of_one_patient_in_two_folds_are_refused():
    """Fold models of two partitions (another seed, another --cv_folds) pooled: a patient scored in two folds, so
    the operating point cross-fitted for one fold was fitted on films of its own patients. It was accepted."""
    from pneumoscan.cv import OutOfFold, cross_fitted
    from pneumoscan.errors import CheckpointError

    good = _oof(3.0)
    cross_fitted(good)  # one patient per film, each in one fold
    patients = list(good.patients)
    patients[1] = patients[0]  # films 0 and 1 (folds 0 and 1) are one patient's
    with pytest.raises(CheckpointError, match="1 patient\\(s\\) are scored in two folds"):
        OutOfFold(good.logits, good.labels, patients, good.folds)
    same_fold = list(good.patients)
    same_fold[3] = same_fold[0]  # films 0 and 3 (both fold 0): one patient's two films in one fold is fine
    OutOfFold(good.logits, good.labels, same_fold, good.folds)
    with pytest.raises(ValueError, match="59 patients"):
        OutOfFold(good.logits, good.labels, good.patients[:-1], good.folds)


def test_two_models_of_one_fold_are_refused_when_pooling_out_of_fold(cv_run, smoke_data):
    """The same fold given twice scored its films twice and counted them twice in every OOF number."""
    from pneumoscan.cv import collect_oof
    from pneumoscan.errors import CheckpointError

    fold0 = cv_run / "fold0" / "medical_cnn_model.pth"
    with pytest.raises(CheckpointError, match="are both fold 0"):
        collect_oof([fold0, fold0], str(smoke_data), str(cv_run.parent / "cache"))


def test_an_operating_point_without_films_of_a_class_has_no_value_for_it_not_0():
    """A group of films without pneumonia read sensitivity 0 (a screen that misses every pneumonia), and one
    without normal films specificity 0."""
    from pneumoscan.cv import operating_point

    y, prob = np.array([0, 0, 0]), np.array([0.1, 0.2, 0.7])
    normal_only = operating_point(y, prob, prob >= 0.5)
    assert np.isnan(normal_only["sensitivity"]) and normal_only["specificity"] == pytest.approx(2 / 3)
    pneumonia_only = operating_point(1 - y, prob, prob >= 0.5)
    assert np.isnan(pneumonia_only["specificity"]) and pneumonia_only["sensitivity"] == pytest.approx(1 / 3)
    p = np.array([0.2, 0.9, 0.4, 0.6])
    both = operating_point(np.array([0, 1, 1, 0]), p, p >= 0.5)
    assert (both["sensitivity"], both["specificity"], both["accuracy"]) == (0.5, 0.5, 0.5)


def test_patient_groups_dealt_with_labels_hold_every_class():
    """8 pneumonia patients among 68, dealt into 5 groups without regard to class: a group got none of them, so
    its sensitivity was never measured. Stratified, every group gets one or two; patients stay whole, and the deal
    without labels is the one earlier results were computed with."""
    from pneumoscan.cv import deal_patients

    patients = [f"pos{i}" for i in range(8)] + [f"neg{i}" for i in range(60)]
    films = patients + patients[:5]  # some patients with a second film
    y = np.array([int(p.startswith("pos")) for p in films])
    plain, strat = deal_patients(films, 5), deal_patients(films, 5, y)
    assert min(np.bincount(plain[y == 1], minlength=5)) == 0  # what the unstratified deal does here
    first = slice(0, len(patients))  # one film per patient
    pos_per_group = np.bincount(strat[first][y[first] == 1], minlength=5)
    neg_per_group = np.bincount(strat[first][y[first] == 0], minlength=5)
    assert set(pos_per_group) == {1, 2} and set(neg_per_group) == {12}
    for group in (plain, strat):  # a patient's films share a group
        assert all(len({g for f, g in zip(films, group) if f == p}) == 1 for p in patients)
    assert np.array_equal(plain, deal_patients(films, 5))
