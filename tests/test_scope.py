"""The scope classifier: fitted from data, stored in the checkpoint, refuses what is not a frontal pediatric
chest film with a specific reason, and a lateral or population warning never comes with LOW risk."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from pneumoscan.checkpoint import default_model_path, load_checkpoint, save_checkpoint
from pneumoscan.cli import evaluate_main
from pneumoscan.errors import CheckpointError
from pneumoscan.inference import RISK_HIGH, RISK_LOW, InferenceFailure, InferenceResult, MedicalImageInference
from pneumoscan.preprocess import decode_image
from pneumoscan.scope import IN_SCOPE, ScopeClassifier, pixel_features, scope_inputs, threshold_refusing
from pneumoscan.scope_report import refusal_category

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEV_SHIFT = DATA / "dev_shift"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real chest X-rays not found at {DATA}")
needs_dev_shift = pytest.mark.skipif(not DEV_SHIFT.is_dir(), reason=f"dev_shift films not found at {DEV_SHIFT}")
CLASSES = [IN_SCOPE, "lateral", "non_radiograph"]


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    centres = torch.tensor([[0.0] * 6, [4.0] + [0.0] * 5, [0.0, 4.0] + [0.0] * 4])
    return centres[y] + torch.randn(n, 6, generator=gen), y


@pytest.mark.parametrize("hidden", [0, 16])
def test_fit_separates_classes_and_survives_a_round_trip(hidden):
    x, y = _blobs(1500, 0)
    clf = ScopeClassifier.fit(x, y, CLASSES, hidden=hidden)
    x_val, y_val = _blobs(900, 1)
    clf.set_threshold(x_val[y_val == 0], 0.02)
    p_in = clf.probabilities(x_val)[:, clf.in_index]
    refused = p_in < clf.threshold
    assert float(refused[y_val == 0].float().mean()) <= 0.02  # the budget on held-out in-scope rows
    assert float(refused[y_val != 0].float().mean()) > 0.9
    restored = ScopeClassifier.from_dict(clf.to_dict())
    assert torch.allclose(restored.probabilities(x_val), clf.probabilities(x_val))
    assert restored.threshold == clf.threshold and restored.classes == CLASSES


@pytest.mark.parametrize("k", [0, 1, 3, 7])
def test_the_threshold_refuses_k_values_and_holds_when_the_boundary_values_move_by_a_rounding(k):
    p = np.random.default_rng(k).uniform(0.05, 0.95, 50)
    t = threshold_refusing(p, k)
    assert int((p < t).sum()) == k
    # the values on either side of it change in their last bits (another CPU): the count does not
    order = np.sort(p)
    for nudge in (-1e-6, 1e-6):
        moved = np.where(np.isin(p, order[max(k - 1, 0):k + 1]), p + nudge, p)
        assert int((moved < t).sum()) == k


def test_the_threshold_stays_close_below_the_first_kept_value():
    logit = lambda q: np.log(q / (1 - q))  # noqa: E731
    far = np.array([0.01, 0.02, 0.16, 0.5])  # refusing 2: the third is kept, the second lies far below it
    t = threshold_refusing(far, 2)
    assert 0.02 < t < 0.16 and logit(0.16) - logit(t) == pytest.approx(0.05)  # out-of-scope inputs lose little
    near = np.array([0.01, 0.1599, 0.16, 0.5])  # closer than the margin: midway
    assert threshold_refusing(near, 2) == pytest.approx((0.1599 + 0.16) / 2)


def test_a_threshold_with_no_room_refuses_nothing_or_everything():
    p = np.array([0.2, 0.4, 0.6])
    assert 0.19 < threshold_refusing(p, -2) < 0.2 and not (p < threshold_refusing(p, -2)).any()
    assert (p < threshold_refusing(p, 5)).all()
    # probabilities of exactly 0 and 1 (float32 reaches them): still the count asked for, never more
    edge = np.array([0.0, 0.0, 0.3, 1.0], dtype=np.float32)
    for k, refused in ((0, 0), (1, 0), (2, 2), (3, 3), (4, 4)):
        assert int((edge < threshold_refusing(edge, k)).sum()) == refused, k


def test_equal_values_are_never_split_and_never_sat_on():
    p = np.array([0.1, 0.2, 0.2, 0.5])
    t = threshold_refusing(p, 2)  # the 2nd and 3rd are equal: only the one below them can be refused
    assert int((p < t).sum()) == 1 and 0.1 < t < 0.2
    with pytest.raises(ValueError, match="no in-scope values"):
        threshold_refusing(np.array([]), 0)


def test_a_classifier_of_another_kind_is_refused():
    with pytest.raises(ValueError, match="refit it"):
        ScopeClassifier.from_dict({"kind": "something-else"})


def test_pixel_features_see_symmetry_and_layout():
    rng = np.random.default_rng(0)
    half = rng.integers(0, 256, (2, 224, 112), dtype=np.uint8)
    symmetric = np.concatenate([half, half[:, :, ::-1]], axis=2)
    f = pixel_features(symmetric)
    assert f.shape == (2, 88) and torch.isfinite(f).all()
    assert torch.allclose(f[:, 64 + 16 + 2], torch.ones(2), atol=1e-4)  # left-right correlation
    dark_top = np.zeros((1, 224, 224), np.uint8)
    dark_top[:, 112:] = 200
    thumb = pixel_features(dark_top)[0, :64].reshape(8, 8)
    assert thumb[:4].max() == 0 and thumb[4:].min() > 0.7


@pytest.fixture(scope="module")
def engine() -> MedicalImageInference:
    eng = MedicalImageInference()
    assert eng.scope is not None, "the shipped model must carry its scope classifier"
    return eng


def _film(name: str = "IM-0117-0001.jpeg") -> Image.Image:
    return Image.open(DATA / "fullres_sample" / "NORMAL" / name).convert("L")


def _refusal(engine, img: Image.Image, path: Path) -> str:
    img.save(path)
    [outcome] = engine.predict_batch([path])
    assert isinstance(outcome, InferenceFailure), f"{path.name} was answered: {outcome}"
    assert outcome.error_type == "OutOfScopeError" and outcome.error.startswith(f"{path}: out of scope")
    return refusal_category(outcome.error)


@needs_data
def test_real_pediatric_films_pass(engine):
    files = sorted((DATA / "fullres_sample" / "NORMAL").glob("*.jpeg"))[:6]
    files += sorted((DATA / "fullres_sample" / "PNEUMONIA").glob("*.jpeg"))[:6]
    outcomes = engine.predict_batch(files)
    assert all(isinstance(o, InferenceResult) for o in outcomes), [getattr(o, "error", "") for o in outcomes]


@needs_data
@pytest.mark.parametrize("transform, categories", [
    (lambda im: im.rotate(90, expand=True), {"altered_chest"}),
    (lambda im: im.rotate(180), {"altered_chest"}),
    (ImageOps.invert, {"altered_chest", "non_radiograph"}),
    (lambda im: im.crop((0, 0, im.width // 3, im.height // 3)), {"other_body", "altered_chest"}),
    (lambda im: im.crop((0, int(im.height * 0.4), im.width, int(im.height * 0.6))), {"altered_chest"}),
])
def test_invalid_versions_of_a_real_film_are_refused(engine, tmp_path, transform, categories):
    assert _refusal(engine, transform(_film()), tmp_path / "film.png") in categories


@needs_data
def test_grayscale_face_photo_is_refused_as_not_a_radiograph(engine, tmp_path):
    face = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("L")
    assert _refusal(engine, face, tmp_path / "face.png") in {"non_radiograph", "feature_distance"}


@needs_dev_shift
@pytest.mark.parametrize("folder, stems, category", [
    ("adult_frontal", ("adult_frontal_mhh_1", "adult_frontal_actualmed_2", "adult_frontal_figure1_3"),
     "adult_frontal"),
    ("lateral_chest", ("lateral_chexpertrb_01", "lateral_chexpertrb_05", "lateral_chexpertrb_09"), "lateral"),
    ("other_radiographs", ("other_radiographs_kneeoa_1", "other_radiographs_pelvis_2",
                           "other_radiographs_boneage_3"), "other_body"),
])
def test_dev_shift_films_are_refused_with_their_reason(engine, folder, stems, category):
    """These films were among the classifier's training negatives: this pins behaviour; the held-out
    (leave-one-source-out) rates are measured by experiments/fit_scope.py (docs/scope.md)."""
    files = [next((DEV_SHIFT / folder).glob(f"{s}.*")) for s in stems]
    outcomes = engine.predict_batch(files)
    assert all(isinstance(o, InferenceFailure) for o in outcomes), outcomes
    assert [refusal_category(o.error) for o in outcomes] == [category] * len(files)
    if category == "adult_frontal":
        assert all("outside the validated population" in o.error for o in outcomes)


@needs_dev_shift
def test_a_folder_name_never_decides_the_reason(engine, tmp_path):
    """The engine's errors start with the path: a folder named for another reason must not count the
    refusals in it under that reason (the scope report of `evaluate`)."""
    from pneumoscan.scope_report import scope_report

    folder = tmp_path / "PA and lateral views, not a radiograph"
    folder.mkdir()
    stems = ("other_radiographs_kneeoa_1", "other_radiographs_pelvis_2", "other_radiographs_boneage_3")
    for stem in stems:
        src = next((DEV_SHIFT / "other_radiographs").glob(f"{stem}.*"))
        (folder / src.name).symlink_to(src)
    outcomes = engine.predict_batch(sorted(folder.iterdir()))
    assert all(isinstance(o, InferenceFailure) for o in outcomes), outcomes
    assert [refusal_category(o.error, o.image_path) for o in outcomes] == ["other_body"] * len(stems)
    assert scope_report(outcomes, str(tmp_path))["all"]["refused_by_reason"] == {"other_body": len(stems)}


@needs_data
def test_lateral_or_population_warning_never_comes_with_low_risk(engine, tmp_path):
    pytest.importorskip("pydicom")
    from dicom_files import dicom_bytes

    film = np.asarray(_film().resize((512, 420)))
    frontal = dicom_bytes(tmp_path, film, filename="pa.dcm", ViewPosition="PA")
    lateral = dicom_bytes(tmp_path, film, filename="lat.dcm", ViewPosition="LATERAL")
    # the other spellings of a lateral, and the views that are neither frontal nor lateral (DICOM's defined terms)
    others = {view: dicom_bytes(tmp_path, film, filename=f"{view}.dcm", ViewPosition=view)
              for view in ("LAT", "LL", "RL", "RLO", "LLO", "RLD", "LLD")}
    qualified = dicom_bytes(tmp_path, film, filename="ap_supine.dcm", ViewPosition="AP SUPINE")
    pa, lat, supine, *rest = engine.predict_batch([frontal, lateral, qualified, *others.values()])
    assert isinstance(pa, InferenceResult) and isinstance(lat, InferenceResult)
    assert pa.risk_level == RISK_LOW  # a confident answer on a frontal film (the control)
    assert supine.risk_level == RISK_LOW and supine.warnings == pa.warnings  # "AP SUPINE" is a frontal view
    assert any("lateral" in w for w in lat.warnings) and lat.risk_level == RISK_HIGH
    assert lat.probabilities == pa.probabilities
    for view, result in zip(others, rest):
        assert isinstance(result, InferenceResult) and result.risk_level == RISK_HIGH, view
        word = "lateral" if view in ("LAT", "LL", "RL") else "not frontal"
        assert any(word in w for w in result.warnings), (view, result.warnings)
    decoded = decode_image(lateral, 224)
    decoded.dicom.is_lateral, decoded.dicom.view_position = False, "PA"
    decoded.dicom.warnings = ["outside the validated population: the patient is an adult"]
    result = engine._result(torch.tensor([0.001, 0.999], dtype=torch.float64), 0.0, None, decoded)
    assert result.risk_level == RISK_HIGH


def test_the_scope_report_counts_flags_by_reason_and_internal_errors_apart_from_unreadable_films(engine, tmp_path):
    pytest.importorskip("pydicom")
    from dicom_files import dicom_bytes

    from pneumoscan.scope_report import format_scope_report, scope_report

    film = np.asarray(_film().resize((512, 420)))
    paths = []
    for name, view in (("pa.dcm", "PA"), ("lat.dcm", "LATERAL")):
        (tmp_path / name).write_bytes(dicom_bytes(tmp_path, film, filename=name, ViewPosition=view))
        paths.append(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a whole image")
    outcomes = engine.predict_batch([*paths, tmp_path / "broken.png"])
    # a model output that was not finite: the service's fault, not the film's (before: counted as unreadable)
    outcomes.append(InferenceFailure(str(tmp_path / "nan.png"), "the model's output is not finite", "InferenceError"))
    report = scope_report(outcomes, tmp_path)["all"]
    assert (report["unreadable"], report["internal_errors"], report["answered"]) == (1, 1, 2)
    assert report["flagged_by_reason"] == {"view (lateral or not frontal)": 1}
    assert report["refused_or_flagged_rate"] == 0.5  # of the 2 films the checks judged
    text = format_scope_report(scope_report(outcomes, tmp_path))
    assert "flagged by reason: view (lateral or not frontal) 1" in text and "internal error" in text


@needs_data
def test_classifier_fitted_on_another_model_is_refused(tmp_path):
    ckpt = load_checkpoint(default_model_path())
    ckpt["scope_classifier"] = dict(ckpt["scope_classifier"], model_digest="0" * 16)
    save_checkpoint(ckpt, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="another model"):
        MedicalImageInference(tmp_path / "other.pth")


@needs_data
def test_checkpoint_without_classifier_warns_and_keeps_the_gate(tmp_path, caplog):
    ckpt = load_checkpoint(default_model_path())
    ckpt["scope_classifier"] = None
    save_checkpoint(ckpt, tmp_path / "noscope.pth")
    eng = MedicalImageInference(tmp_path / "noscope.pth")
    assert "no scope classifier" in caplog.text and eng.scope is None and eng.gate is not None
    assert eng.info["scope_classifier"] is False


@needs_data
def test_stored_classifier_fits_the_models_features(engine):
    """The stored classifier reads exactly the inputs inference builds, and real films pass it."""
    files = sorted((DATA / "chest_xray" / "train" / "NORMAL").glob("*.jpeg"))[:3]
    pixels = torch.stack([engine.model_input(decode_image(f, 224)) for f in files])
    x = scope_inputs(engine.predictor.outputs(pixels).features, pixels)
    assert x.shape == (3, sum(engine.checkpoint["model_kwargs"]["widths"]) + 88) == (3, len(engine.scope.mean))
    assert all(v.in_scope for v in engine.scope.check(engine.predictor.outputs(pixels).features, pixels))


@needs_data
def test_evaluate_reports_refusals_of_an_unlabelled_folder(tmp_path):
    folder = tmp_path / "mixed"
    (folder / "films").mkdir(parents=True)
    (folder / "other").mkdir()
    film = _film()
    film.save(folder / "films" / "child.png")
    film.rotate(90, expand=True).save(folder / "other" / "rotated.png")
    Image.fromarray(np.full((300, 300), 90, np.uint8)).save(folder / "other" / "blank.png")
    (folder / "other" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a whole image")
    out = tmp_path / "scope.json"
    # an unreadable input makes the exit status 1 (some inputs failed), and the report is still written
    assert evaluate_main(["--data_dir", str(folder), "--output_path", str(out), "--n_boot", "10"]) == 1
    report = json.loads(out.read_text())
    assert report["all"]["inputs"] == 4 and report["all"]["refused"] == 2 and report["all"]["answered"] == 1
    assert report["all"]["unreadable"] == 1
    assert report["by_folder"]["other"]["refused_by_reason"] == {"altered_chest": 1, "blank": 1}
    assert report["by_folder"]["films"]["refused"] == 0
    outcomes = {Path(f["path"]).name: (f["outcome"], f["reason"]) for f in report["files"]}
    assert outcomes["broken.png"][0] == "unreadable" and outcomes["broken.png"][1] is None
    assert outcomes["rotated.png"] == ("refused", "altered_chest") and outcomes["child.png"][0] == "answered"


def test_the_gate_is_fitted_on_in_scope_films_only(experiment):
    """The scope corpus files rotated or cropped copies of training patients' films under the source
    ``ped_train``; the distance gate must not take them in as NORMAL training films (it did before)."""
    scope_data = experiment("scope_data")
    classes = ["in_scope", "altered_chest", "other_body", "in_scope", "altered_chest", "in_scope", "adult_frontal"]
    sources = ["ped_train", "ped_train", "ped_train", "ped_val", "ped_val", "fullres_train", "some/repo"]
    n = len(classes)
    table = scope_data.Table([f"f{i}" for i in range(n)], classes, sources, [np.zeros((n, 2), np.float32)],
                             np.zeros((n, 4, 4), np.uint8), np.zeros(n), np.zeros(n), np.ones(n), np.zeros((n, 2)),
                             np.full(n, 224))
    train_rows, val_rows = scope_data.gate_fit_rows(table)
    assert np.flatnonzero(train_rows).tolist() == [0] and np.flatnonzero(val_rows).tolist() == [3]


def test_acquisition_copies_for_the_gate_are_seeded_and_changed(experiment):
    """``fit_scope.py --gate_copies`` fits the gate on augmented copies of the training films: copy k is
    drawn with seed k (a refit reproduces the gate), each copy changes the films, and two copies differ."""
    import torch

    scope_data = experiment("scope_data")
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (3, 64, 64), dtype=np.uint8))
    first, second = scope_data.augmented_copies(images, 2)
    again = scope_data.augmented_copies(images, 1)[0]
    assert first.dtype == torch.uint8 and first.shape == images.shape
    assert torch.equal(first, again)
    assert not torch.equal(first, images) and not torch.equal(first, second)
    table = scope_data.Table(["a"], ["in_scope"], ["ped_train"], [np.zeros((1, 2), np.float32)],
                             np.zeros((1, 4, 4), np.uint8), np.zeros(1), np.zeros(1), np.ones(1), np.zeros((1, 2)),
                             np.full(1, 224))
    with pytest.raises(ValueError, match="predictor"):
        scope_data.fit_gate(table, 0.999, copies=1)


def test_the_gate_stores_the_scores_of_each_out_of_scope_reference_set(experiment):
    """``fit_scope.py --write`` and ``gate_alone.py --store`` put into the gate one distance score per dev_shift
    film of each class and per generated non-radiograph, under a readable name, in the table's order."""
    import torch

    from pneumoscan.gate import OutOfScopeGate

    scope_data = experiment("scope_data")
    gen = torch.Generator().manual_seed(0)
    gate = OutOfScopeGate.fit([torch.randn(100, 3, generator=gen)], torch.zeros(100, dtype=torch.long),
                              [torch.randn(50, 3, generator=gen)], layers=(0,), quantile=0.99)
    feats = torch.randn(5, 3, generator=gen) * 4
    classes = ["adult_frontal", "lateral", "adult_frontal", "other_body", "lateral"]

    def table(cls, f):
        n = len(cls)
        return scope_data.Table([f"f{i}" for i in range(n)], cls, ["repo"] * n, [f.numpy()], np.zeros((n, 4, 4)),
                                np.zeros(n), np.zeros(n), np.ones(n), np.zeros((n, 2)), np.full(n, 224))

    sets = scope_data.reference_sets(table(classes, feats), table(["non_radiograph"] * 2, feats[:2]))
    scores = scope_data.reference_scores(gate, sets)
    assert list(scores) == ["dev_shift adult frontal films", "dev_shift lateral chest films",
                            "dev_shift other-body radiographs", "generated non-radiographs"]
    every = gate.scores([feats]).tolist()
    assert scores["dev_shift adult frontal films"] == [every[0], every[2]]
    assert scores["generated non-radiographs"] == every[:2]
    assert list(scope_data.reference_sets(table(classes, feats), None)) == list(scores)[:3]


def test_cached_augmented_features_are_not_reused_after_the_augmentation_changes(tmp_path, monkeypatch, experiment):
    """Augmented copies' features are cached on disk; a change to ``pneumoscan/augment.py`` (or another level)
    must make new copies, not silently reuse features of the old ones."""
    from pneumoscan.checkpoint import default_model_path, load_checkpoint
    from pneumoscan.predict import Predictor

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    scope_data = experiment("scope_data")
    predictor = Predictor.from_checkpoint(load_checkpoint(default_model_path()), "cpu")
    rng = np.random.default_rng(0)
    table = scope_data.Table(["a", "b"], ["in_scope"] * 2, ["ped_train"] * 2, [np.zeros((2, 2), np.float32)],
                             rng.integers(0, 256, (2, 224, 224), dtype=np.uint8), np.zeros(2), np.zeros(2),
                             np.ones(2), np.zeros((2, 2)), np.full(2, 224))
    cached = lambda: sorted(p.name for p in tmp_path.rglob("*.npz"))  # noqa: E731
    first = scope_data.augmented_features(predictor, table, 1)
    assert len(cached()) == 1
    assert all(np.array_equal(a, b) for a, b in zip(first, scope_data.augmented_features(predictor, table, 1)))
    assert len(cached()) == 1  # same code, same level: reused
    scope_data.augmented_features(predictor, table, 1, level="strong")
    assert len(cached()) == 2
    monkeypatch.setattr(scope_data, "augment_digest", lambda: "edited")
    scope_data.augmented_features(predictor, table, 1)
    assert len(cached()) == 3


def test_augmented_negatives_are_fitted_with_their_source_and_never_counted(tmp_path, monkeypatch, experiment):
    """``fit_scope.py --negative_copies``: a copy of a dev_shift film keeps its film's class and source, so leaving
    that source out leaves its copies out too, and no rate counts a copy (the rule of docs/experiments.md,
    "A scope classifier that has seen processed adult films", depends on both)."""
    import torch

    from pneumoscan.checkpoint import default_model_path, load_checkpoint
    from pneumoscan.gate import OutOfScopeGate
    from pneumoscan.predict import Predictor

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    scope_data = experiment("scope_data")
    fit_scope = experiment("fit_scope")
    rng = np.random.default_rng(1)

    def table(names, classes, sources, size=224, feats=None):
        n = len(names)
        return scope_data.Table(names, classes, sources, feats or [rng.normal(size=(n, 3)).astype(np.float32)],
                                rng.integers(0, 256, (n, size, size), dtype=np.uint8), np.zeros(n),
                                np.full(n, 50.0), np.ones(n), np.zeros((n, 2)), np.full(n, 224))

    predictor = Predictor.from_checkpoint(load_checkpoint(default_model_path()), "cpu")
    dev = table(["a/x.jpg", "b/y.jpg"], ["adult_frontal", "lateral"], ["repo/a", "repo/b"])
    copies = scope_data.augmented_rows(predictor, dev, 2)  # what fit_scope adds for --negative_copies
    assert copies.names == ["a/x.jpg#acq0", "b/y.jpg#acq0", "a/x.jpg#acq1", "b/y.jpg#acq1"]
    assert copies.classes == dev.classes * 2 and copies.sources == dev.sources * 2
    assert len(copies.feats) == 5 and len(copies.feats[0]) == 4  # the model's blocks, one row per copy
    assert scope_data.is_copy(copies.names).all() and not scope_data.is_copy(["a/x#acq.jpg", "p#acq1.png"]).any()

    names = ["ped/t1", "ped/t2", "ped/v1", "r1", "r2", "r3", "r1#acq0", "r2#acq0", "r3#acq0"]
    sources = ["ped_train", "ped_train", "ped_val", "repo/a", "repo/a", "repo/b", "repo/a", "repo/a", "repo/b"]
    classes = ["in_scope"] * 3 + ["adult_frontal"] * 6
    t = table(names, classes, sources, size=16)
    gen = torch.Generator().manual_seed(0)
    gate = OutOfScopeGate.fit([torch.randn(50, 3, generator=gen)], torch.zeros(50, dtype=torch.long),
                              [torch.randn(20, 3, generator=gen)], layers=(0,), quantile=0.99)
    pipe = fit_scope.Pipeline(t, gate)
    assert pipe.counted("repo/a").tolist() == [3, 4] and pipe.counted("repo/b").tolist() == [5]
    assert np.flatnonzero(pipe.without("repo/a")).tolist() == [0, 1, 5, 8]  # its copies leave with it; ped_val never in


def test_fit_scope_will_not_rewrite_the_shipped_checks_under_the_same_version(tmp_path, capsys, experiment):
    """``fit_scope.py --write`` on the shipped file without ``--model_version`` would give predictions made
    with other checks the old version's name; it is refused before anything is read."""
    from pneumoscan.checkpoint import default_model_path

    fit_scope = experiment("fit_scope")
    missing = str(tmp_path / "missing")  # were the guard gone, the run would stop here, before any write
    with pytest.raises(SystemExit) as exit_info:
        fit_scope.main(["--model_path", missing + ".pth", "--data_root", missing, "--write", str(default_model_path())])
    assert exit_info.value.code == 2
    assert "--model_version" in capsys.readouterr().err


def test_the_scope_replay_records_each_files_size_for_the_size_floor(experiment, real_jpeg, tmp_path):
    """fit_scope.py replays the pixel stage on cached tables: they keep each file's shorter side as inference sees
    it (the stored size, not a reduced decode), and caches made before that column read it from the files."""
    from PIL import Image

    from pneumoscan.checkpoint import input_spec

    scope_data = experiment("scope_data")
    film = Image.open(real_jpeg).convert("L")
    thumb = tmp_path / "thumb.png"
    film.resize((48, 80)).save(thumb)
    spec = input_spec(load_checkpoint(default_model_path()))
    arrays = scope_data.decoded_arrays([thumb, real_jpeg], spec)
    assert arrays["min_side"].tolist() == [48, min(film.size)]
    assert scope_data.stored_min_sides([thumb, real_jpeg]).tolist() == [48, min(film.size)]
