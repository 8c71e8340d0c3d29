"""model.Ensemble and ensemble.py: averaged logits, members' own normalisation, side-by-side features,
checkpoints (float16 storage included), Grad-CAM and the ONNX graph of an ensemble."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pneumoscan.checkpoint import load_checkpoint, model_payload, save_checkpoint
from pneumoscan.ensemble import build_ensemble, ensemble_payload
from pneumoscan.errors import CheckpointError
from pneumoscan.model import model_from_kwargs, model_kwargs
from pneumoscan.predict import InputSpec, Predictor
from pneumoscan.preprocess import load_image

SIZE = 64


def member(seed: int, mean: float, std: float, size: int = SIZE, width: float = 0.25) -> dict:
    torch.manual_seed(seed)
    kw = model_kwargs("medical_cnn", 3, width=width)
    return model_payload(model_from_kwargs(kw), arch="medical_cnn", model_kw=kw, spec=InputSpec(size, mean, std, 3),
                         config={"seed": seed}, temperature=1.3, threshold=0.5)


@pytest.fixture(scope="module")
def members() -> list[dict]:
    return [member(0, 0.48, 0.24), member(1, 0.50, 0.20), member(2, 0.45, 0.26, width=0.5)]


@pytest.fixture(scope="module")
def images(train_dir) -> torch.Tensor:
    paths = sorted((train_dir / "NORMAL").iterdir())[:2] + sorted((train_dir / "PNEUMONIA").iterdir())[:2]
    return torch.from_numpy(np.stack([load_image(p, SIZE) for p in paths]))


def test_ensemble_logits_are_the_mean_of_each_member_on_its_own_normalisation(members, images):
    model, spec = build_ensemble(members)
    assert (spec.mean, spec.std, spec.image_size) == (0.0, 1.0, SIZE)
    ens = Predictor(model, spec).outputs(images)
    singles = [Predictor.from_checkpoint(m).outputs(images) for m in members]
    torch.testing.assert_close(ens.logits, torch.stack([s.logits for s in singles]).mean(0), rtol=0, atol=1e-5)
    assert len(ens.features) == 5
    for b, feats in enumerate(ens.features):  # block b: the members' features side by side
        torch.testing.assert_close(feats, torch.cat([s.features[b] for s in singles], 1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("half", [False, True])
def test_ensemble_checkpoint_round_trips(members, images, tmp_path, half):
    path = tmp_path / "ens.pth"
    save_checkpoint(ensemble_payload(members, temperature=0.8, threshold=0.4, half=half), path)
    ckpt = load_checkpoint(path)
    assert ckpt["arch"] == "ensemble" and len(ckpt["model_kwargs"]["ensemble"]) == 3
    assert ckpt["model_kwargs"]["widths"] == [8 + 8 + 16, 16 + 16 + 32, 32 + 32 + 64, 64 + 64 + 128, 128 + 128 + 256]
    assert (ckpt["model_state"]["members.0.fc2.weight"].dtype == torch.float16) is half
    loaded = Predictor.from_checkpoint(ckpt)
    assert loaded.temperature == 0.8 and next(loaded.model.parameters()).dtype == torch.float32
    model, spec = build_ensemble(members)
    expected = Predictor(model, spec).logits(images)
    torch.testing.assert_close(loaded.logits(images), expected, rtol=0, atol=2e-2 if half else 1e-6)


def test_members_that_expect_other_inputs_cannot_be_combined(members):
    with pytest.raises(CheckpointError, match="different inputs"):
        build_ensemble([members[0], member(3, 0.5, 0.2, size=96)])
    equalized = member(4, 0.5, 0.29)
    equalized["input_spec"]["intensity"] = "equalize"
    with pytest.raises(CheckpointError, match="intensity"):
        build_ensemble([members[0], equalized])
    assert build_ensemble([equalized, equalized])[1].intensity == "equalize"
    with pytest.raises(CheckpointError, match="at least one"):
        build_ensemble([])
    nested = ensemble_payload(members[:2], temperature=None, threshold=0.5)
    with pytest.raises(CheckpointError, match="itself an ensemble"):
        build_ensemble([nested])


@pytest.mark.parametrize("names", [["PNEUMONIA", "NORMAL"], ["NORMAL", "VIRAL", "BACTERIAL"]])
def test_a_member_with_other_classes_or_their_order_cannot_be_combined(members, names):
    """A member whose first output is PNEUMONIA had its logits averaged as if it were NORMAL's, silently."""
    other = {**members[1], "class_names": names}
    with pytest.raises(CheckpointError, match=r"member 1 outputs the classes \[.*PNEUMONIA.*cannot be averaged"):
        build_ensemble([members[0], other])
    with pytest.raises(CheckpointError, match="member 0 outputs"):
        ensemble_payload([other, members[0]], temperature=None, threshold=0.5)
    assert build_ensemble([members[0], {**members[1], "class_names": ["NORMAL", "PNEUMONIA"]}])


def test_gradcam_of_an_ensemble(members, images):
    model, spec = build_ensemble(members)
    cam = Predictor(model, spec).gradcam(images[2])
    assert cam.shape == (SIZE, SIZE) and cam.min() >= 0.0 and cam.max() <= 1.0
    # one member: exactly that model's map
    solo, solo_spec = build_ensemble(members[:1])
    torch.testing.assert_close(torch.from_numpy(Predictor(solo, solo_spec).gradcam(images[2])),
                               torch.from_numpy(Predictor.from_checkpoint(members[0]).gradcam(images[2])),
                               rtol=0, atol=1e-5)


def test_onnx_graph_of_an_ensemble_equals_torch(members, images, tmp_path):
    pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed")
    from pneumoscan.backends import make_predictor

    ckpt = ensemble_payload(members, temperature=0.8, threshold=0.4)
    expected = Predictor.from_checkpoint(ckpt).outputs(images)
    got = make_predictor(ckpt, "cpu", "onnx").outputs(images)
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=1e-4)
    for g, e in zip(got.features, expected.features):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-4)


def test_an_ensemble_is_only_written_with_held_out_patients_to_calibrate_on(members, tmp_path):
    from pneumoscan.ensemble import write_ensemble

    folds = [{**m, "config": {"seed": 42, "val_fraction": 0.15, "cv_folds": 5, "cv_fold": i}}
             for i, m in enumerate(members)]  # k-fold runs that trained on the usual validation patients
    with pytest.raises(CheckpointError, match="member 0 was trained on the usual validation patients.*--holdout"):
        write_ensemble(folds, tmp_path / "ens.pth", data_dir=str(tmp_path))
    with pytest.raises(CheckpointError, match="member 0: its config does not record"):
        write_ensemble(members, tmp_path / "ens.pth", data_dir=str(tmp_path))  # configs without a split
    assert not (tmp_path / "ens.pth").exists()


PLAIN = {"seed": 42, "val_fraction": 0.15, "min_val_images": 100, "cv_folds": 0}


@pytest.mark.parametrize("start, outcome", [
    ({**PLAIN, "init_from": ""}, None),  # started from a plain run on the same split: fine
    ({**PLAIN, "cv_folds": 5, "cv_fold": 2, "cv_holdout": True}, None),  # from a held-out fold: fine
    ({**PLAIN, "cv_folds": 5, "cv_fold": 2}, "starting weights .*trained on the usual validation patients"),
    ({**PLAIN, "seed": 7}, "different splits"),  # their validation patients are others: they trained on ours
    ({**PLAIN, "init_from": "older.pth", "init_split": {**PLAIN, "seed": 3}}, "different splits"),  # two steps back
])
def test_a_fine_tune_is_checked_for_the_patients_its_starting_weights_trained_on(start, outcome):
    from pneumoscan.ensemble import _calibration_split

    tuned = {**PLAIN, "init_from": "start.pth", "init_split": start}
    if outcome is None:
        assert _calibration_split([PLAIN, tuned]) == (42, 0.15, 100, "")
    else:
        with pytest.raises(CheckpointError, match=outcome):
            _calibration_split([PLAIN, tuned])


def test_a_fine_tune_without_a_record_of_its_start_is_accepted_with_a_warning(caplog):
    from pneumoscan.ensemble import _calibration_split

    older = {**PLAIN, "init_from": "shipped"}  # e.g. the shipped v2.1, fine-tuned before the record existed
    assert _calibration_split([PLAIN, older]) == (42, 0.15, 100, "")
    assert "member 1 (fine-tuned from shipped)" in caplog.text and "cannot be checked" in caplog.text


def _perturbed(ckpt: dict, seed: int) -> dict:
    """A copy of a checkpoint with its weights moved a little (a second member that differs)."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: v + 0.05 * v.std() * torch.randn(v.shape, generator=gen) if v.is_floating_point() and v.numel() > 1
             else v for k, v in ckpt["model_state"].items()}
    return {**ckpt, "model_state": state}


def test_fine_tunes_on_the_usual_split_make_an_ensemble_calibrated_on_its_validation_patients(trained_run,
                                                                                                 trained_model,
                                                                                                 tmp_path):
    from pneumoscan.data import split_from_config
    from pneumoscan.ensemble import write_ensemble

    first = load_checkpoint(trained_model)
    assert not first["config"].get("cv_folds")  # a plain run: trained on the usual split's training patients
    plain = [first, _perturbed(first, 1)]
    path = tmp_path / "ens.pth"
    final = write_ensemble(plain, path, data_dir=str(trained_run.data), cache_dir=str(trained_run.cache))
    ckpt = load_checkpoint(path)
    assert ckpt["arch"] == "ensemble" and ckpt["temperature"] == pytest.approx(final["temperature"])
    assert ckpt["ood_gate"] is not None and ckpt["config"]["ensemble_of"]["folds"] == [None, None]
    own = split_from_config(ckpt["config"], str(trained_run.data), first["input_spec"]["image_size"],
                            str(trained_run.cache))
    theirs = split_from_config(first["config"], str(trained_run.data), first["input_spec"]["image_size"],
                               str(trained_run.cache))
    assert own.val.paths == theirs.val.paths  # later tools find the members' validation patients as its own
    # calibrated on exactly those patients, with the (float16) weights it stores: its own logits give the stored
    # temperature and threshold to the last digit
    from pneumoscan.calibration import fit_calibrated_point

    assert ckpt["weights_dtype"] == "float16"
    t, thr, _ = fit_calibrated_point(Predictor.from_checkpoint(ckpt).logits(theirs.val.images), theirs.val.labels,
                                     0.95, if_separable=(None, 0.0))
    assert ckpt["temperature"] == t and ckpt["threshold"] == thr
    # the ensemble's logits are the members' mean
    images = torch.from_numpy(np.stack([load_image(p, first["input_spec"]["image_size"]) for p in own.val.paths[:4]]))
    expected = torch.stack([Predictor.from_checkpoint(m).logits(images) for m in plain]).mean(0)
    torch.testing.assert_close(Predictor.from_checkpoint(ckpt).logits(images), expected, rtol=0, atol=2e-2)


def test_members_fitted_for_other_target_sensitivities_are_named(trained_run, trained_model, tmp_path, caplog):
    """The ensemble's threshold is fitted for member 0's target sensitivity; another member's was ignored silently."""
    from pneumoscan.ensemble import write_ensemble

    first = load_checkpoint(trained_model)
    second = {**_perturbed(first, 5), "config": {**first["config"], "target_sensitivity": 0.9}}
    final = write_ensemble([first, second], tmp_path / "ens.pth", data_dir=str(trained_run.data),
                           cache_dir=str(trained_run.cache))
    assert "different target sensitivities (0.95, 0.9)" in caplog.text and "member 0's, 0.95" in caplog.text
    assert final["validation"]["at_threshold"]["metrics"]["sensitivity"]["value"] >= 0.95


@pytest.mark.parametrize("change, match", [({"seed": 7}, "different splits"),
                                           ({"val_fraction": 0.2}, "different splits"),
                                           ({"cv_folds": 5, "cv_fold": 1, "cv_holdout": False}, "member 1"),
                                           ({"val_fraction": None}, "member 1")])
def test_an_ensemble_of_members_validated_on_different_patients_is_refused(trained_model, tmp_path, change, match):
    from pneumoscan.ensemble import write_ensemble

    first = load_checkpoint(trained_model)
    config = {k: v for k, v in {**first["config"], **change}.items() if v is not None}
    with pytest.raises(CheckpointError, match=match):
        write_ensemble([first, {**first, "config": config}], tmp_path / "ens.pth", data_dir=str(tmp_path))
    assert not (tmp_path / "ens.pth").exists()


def test_the_ensemble_command_writes_a_checkpoint_that_predicts(trained_run, trained_model, tmp_path, fullres_dir,
                                                                capsys):
    from pneumoscan.cli import EXIT_OK, main
    from pneumoscan.inference import MedicalImageInference

    out = tmp_path / "pair.pth"
    save_checkpoint(_perturbed(load_checkpoint(trained_model), 2), tmp_path / "second.pth")
    code = main(["ensemble", "--members", str(trained_model), str(tmp_path / "second.pth"), "--data_dir",
                 str(trained_run.data), "--output_path", str(out), "--cache_dir", str(trained_run.cache)])
    ckpt = load_checkpoint(out)
    assert code == EXIT_OK and ckpt["weights_dtype"] == "float16"
    # two full-width networks: the last block's 1024-wide precision matrix is stored packed (format 5), and read
    assert ckpt["model_kwargs"]["widths"][-1] == 1024 and ckpt["ood_gate"]["precisions"][-1].dim() == 1
    assert ckpt["format_version"] == 5
    printed = capsys.readouterr().out
    assert f"wrote {out}: 2 members" in printed and "no scope classifier" in printed
    result = MedicalImageInference(str(out), device="cpu").predict_image(str(next((fullres_dir / "NORMAL").iterdir())))
    assert result.prediction in ("NORMAL", "PNEUMONIA") and 0.0 <= result.probabilities["PNEUMONIA"] <= 1.0


@pytest.mark.parametrize("case, message", [("member", "is the checkpoint being combined"),
                                           ("exists", "exists already"),
                                           ("no_data", "is not a folder"),
                                           ("other_patients", "member 1 was validated on other patients"),
                                           ("copy", "members 0 and 1 have identical weights"),
                                           ("twice", "members 0 and 1 have identical weights")])
def test_the_ensemble_command_refuses_bad_input_and_writes_nothing(trained_run, trained_model, tmp_path, capsys,
                                                                   case, message):
    from pneumoscan.cli import EXIT_BAD_INPUT, main

    first = load_checkpoint(trained_model)
    second = tmp_path / "second.pth"
    config = first["config"] if case != "other_patients" else {**first["config"], "val_patients_sha256": "0" * 64}
    save_checkpoint({**(first if case == "copy" else _perturbed(first, 3)), "config": config}, second)
    if case == "twice":
        second = trained_model
    out = {"member": second, "exists": tmp_path / "old.pth"}.get(case, tmp_path / "new.pth")
    if case == "exists":
        out.write_bytes(b"an earlier ensemble")
    before = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    data = tmp_path / "missing" if case == "no_data" else trained_run.data
    code = main(["ensemble", "--members", str(trained_model), str(second), "--data_dir", str(data),
                 "--output_path", str(out), "--cache_dir", str(trained_run.cache)])
    assert code == EXIT_BAD_INPUT and message in capsys.readouterr().err
    assert {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before  # nothing written or replaced


def test_members_validated_on_other_patients_than_the_folder_given_are_refused(trained_run, trained_model, tmp_path):
    from pneumoscan.data import patients_digest, split_from_config
    from pneumoscan.ensemble import write_ensemble

    first = load_checkpoint(trained_model)
    val = split_from_config(first["config"], str(trained_run.data), first["input_spec"]["image_size"],
                            str(trained_run.cache)).val
    assert first["config"]["val_patients_sha256"] == patients_digest(val.patients)  # recorded by training
    other = {**_perturbed(first, 4), "config": {**first["config"],
                                                "val_patients_sha256": patients_digest(["someone else"])}}
    with pytest.raises(CheckpointError, match="member 1 was validated on other patients"):
        write_ensemble([first, other], tmp_path / "ens.pth", data_dir=str(trained_run.data),
                       cache_dir=str(trained_run.cache))
    assert not (tmp_path / "ens.pth").exists()
