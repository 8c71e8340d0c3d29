"""End to end: MedicalImageInference and the predict / evaluate CLIs on the model the smoke run trained."""

from __future__ import annotations

import json
from datetime import datetime

import numpy as np
import pytest
from PIL import Image

from pneumoscan.checkpoint import load_checkpoint
from pneumoscan.cli import evaluate_main, predict_main
from pneumoscan.errors import CheckpointError, DataError
from pneumoscan.inference import (
    InferenceFailure,
    InferenceResult,
    MedicalImageInference,
    list_inputs,
    normalized_entropy,
    risk_level,
)
from pneumoscan.metrics import METRIC_NAMES, binary_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(trained_model) -> MedicalImageInference:
    return MedicalImageInference(trained_model, device="cpu")


@pytest.fixture(scope="module")
def good_files(engine, smoke_files) -> list:
    """Three real radiographs per class that the engine accepts.

    The trained checkpoint carries an out-of-scope gate whose feature-distance threshold is a high
    quantile of the validation distances, so by construction an occasional real radiograph (the most
    distant validation image) is refused; these tests are about everything else, so they use files
    the gate lets through, and check that it lets through nearly all of them.
    """
    chosen = []
    for cls in ("NORMAL", "PNEUMONIA"):
        candidates = smoke_files[cls][:8]
        outcomes = engine.predict_batch(candidates)
        accepted = [p for p, o in zip(candidates, outcomes) if isinstance(o, InferenceResult)]
        refused = [o for o in outcomes if isinstance(o, InferenceFailure)]
        assert all(o.error_type == "OutOfScopeError" for o in refused), refused
        assert len(accepted) >= 6, f"the gate refused {len(refused)} of 8 real {cls} training radiographs"
        chosen += accepted[:3]
    return chosen


def check_result(r: InferenceResult, engine: MedicalImageInference) -> None:
    assert isinstance(r, InferenceResult)
    assert set(r.probabilities) == {"NORMAL", "PNEUMONIA"}
    assert sum(r.probabilities.values()) == pytest.approx(1.0, abs=1e-9)
    assert all(0.0 <= p <= 1.0 for p in r.probabilities.values())
    assert r.threshold == engine.threshold
    expected = "PNEUMONIA" if r.probabilities["PNEUMONIA"] >= r.threshold else "NORMAL"
    assert r.prediction == expected
    assert r.confidence == pytest.approx(r.probabilities[r.prediction])
    assert r.uncertainty == pytest.approx(normalized_entropy([r.probabilities["NORMAL"], r.probabilities["PNEUMONIA"]]))
    assert r.risk_level == risk_level(r.confidence, r.uncertainty)
    stamp = datetime.fromisoformat(r.timestamp)
    assert stamp.tzinfo is not None
    assert r.processing_time > 0


def test_predict_image(engine, good_files):
    path = good_files[-1]
    r = engine.predict_image(path)
    check_result(r, engine)
    assert r.image_path == str(path)
    assert r.calibrated is True  # the trained checkpoint carries a temperature
    assert r.model_version


def test_engine_uses_the_checkpoint_settings(engine, trained_model):
    ckpt = load_checkpoint(trained_model)
    assert engine.threshold == pytest.approx(ckpt["threshold"])
    assert engine.image_size == ckpt["input_spec"]["image_size"] == 64
    assert engine.info["calibrated"] and engine.info["model_path"] == str(trained_model)


def test_bytes_and_path_agree(engine, good_files):
    a = engine.predict_image(good_files[0])
    b = engine.predict_image(good_files[0].read_bytes())
    assert b.image_path is None
    assert a.probabilities["PNEUMONIA"] == pytest.approx(b.probabilities["PNEUMONIA"], abs=1e-9)


def test_full_resolution_originals(engine, fullres_dir):
    paths = sorted((fullres_dir / "PNEUMONIA").iterdir())[:4] + sorted((fullres_dir / "NORMAL").iterdir())[:4]
    outcomes = engine.predict_batch(paths)
    accepted = [o for o in outcomes if isinstance(o, InferenceResult)]
    assert len(accepted) >= 6, [o.error for o in outcomes if isinstance(o, InferenceFailure)]
    for r in accepted:
        check_result(r, engine)


def test_threshold_override_moves_the_decision(trained_model, good_files):
    p = MedicalImageInference(trained_model, device="cpu").predict_image(good_files[0]).probabilities["PNEUMONIA"]
    assert 0.0 < p < 1.0
    low = MedicalImageInference(trained_model, device="cpu", threshold=p / 2).predict_image(good_files[0])
    high = MedicalImageInference(trained_model, device="cpu", threshold=(p + 1) / 2).predict_image(good_files[0])
    assert (low.prediction, high.prediction) == ("PNEUMONIA", "NORMAL")
    assert low.threshold == pytest.approx(p / 2)
    with pytest.raises(ValueError, match="threshold"):
        MedicalImageInference(trained_model, device="cpu", threshold=1.5)


@pytest.mark.parametrize("batch_size", [16, 2])
def test_predict_batch_isolates_bad_files(trained_model, good_files, tmp_path, make_bad_files, batch_size):
    engine = MedicalImageInference(trained_model, device="cpu", batch_size=batch_size)
    bad = make_bad_files(tmp_path)
    g = good_files
    paths = [g[0], bad["empty"], g[1], g[2], bad["text"], g[3], bad["truncated"], g[4], g[5]]
    out = engine.predict_batch(paths)
    assert len(out) == len(paths)
    failed = [i for i, o in enumerate(out) if isinstance(o, InferenceFailure)]
    assert failed == [1, 4, 6]
    for i in failed:
        assert out[i].image_path == str(paths[i])
        assert out[i].error_type == "ImageError" and str(paths[i]) in out[i].error
        datetime.fromisoformat(out[i].timestamp)
    assert "empty" in out[1].error and "not a recognised image" in out[4].error and "truncated" in out[6].error
    for i, o in enumerate(out):
        if i in failed:
            continue
        check_result(o, engine)
        assert o.image_path == str(paths[i])
        single = engine.predict_image(paths[i])
        assert o.probabilities["PNEUMONIA"] == pytest.approx(single.probabilities["PNEUMONIA"], abs=1e-5)


def test_a_linked_folder_is_listed_once_and_a_link_loop_ends(good_files, tmp_path, caplog):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "b.jpeg").symlink_to(good_files[1])
    base = tmp_path / "films"
    base.mkdir()
    (base / "a.jpeg").symlink_to(good_files[0])
    (base / "site2").symlink_to(elsewhere)  # how evaluation sets are often assembled
    (base / "site2_again").symlink_to(elsewhere)
    (elsewhere / "loop").symlink_to(base)
    assert [p.relative_to(base).as_posix() for p in list_inputs(base)] == ["a.jpeg", "site2/b.jpeg"]
    assert "already listed" in caplog.text


def test_predict_directory_skips_hidden_and_macosx(engine, good_files, tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "__MACOSX").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "a.jpeg").symlink_to(good_files[0])
    (tmp_path / "sub" / "b.JPEG").symlink_to(good_files[1])
    (tmp_path / "__MACOSX" / "c.jpeg").symlink_to(good_files[2])
    (tmp_path / ".hidden" / "d.jpeg").symlink_to(good_files[3])
    (tmp_path / "._e.jpeg").write_bytes(b"\x00\x05\x16\x07")
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in list_inputs(tmp_path)] == ["a.jpeg", "b.JPEG"]
    assert [p.name for p in list_inputs(tmp_path, recursive=False)] == ["a.jpeg"]
    out = engine.predict_directory(tmp_path)
    assert [o.image_path for o in out] == [str(tmp_path / "a.jpeg"), str(tmp_path / "sub" / "b.JPEG")]
    with pytest.raises(DataError):
        engine.predict_directory(tmp_path / "missing")


def test_missing_model_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError):
        MedicalImageInference(tmp_path / "nope.pth", device="cpu")


# --- the predict CLI -------------------------------------------------------------------------------


def predict(model, *args) -> int:
    return predict_main(["--model_path", str(model), "--device", "cpu", *map(str, args)])


def test_predict_main_folder_with_failures(trained_model, good_files, tmp_path, make_bad_files):
    folder = tmp_path / "images"
    (folder / "nested").mkdir(parents=True)
    for p in good_files[:4]:
        (folder / p.name).symlink_to(p)
    (folder / "nested" / good_files[4].name).symlink_to(good_files[4])
    bad = make_bad_files(folder)
    out = tmp_path / "pred.json"
    assert predict(trained_model, "--image_dir", folder, "--output_path", out) == 1
    doc = json.loads(out.read_text())
    assert len(doc["results"]) == 5 and len(doc["errors"]) == 3
    assert doc["summary"] == {"files": 8, "predicted": 5, "failed": 3}
    assert sorted(e["image_path"] for e in doc["errors"]) == sorted(str(p) for p in bad.values())
    for r in doc["results"]:
        assert r["prediction"] in ("NORMAL", "PNEUMONIA")
        assert sum(r["probabilities"].values()) == pytest.approx(1.0)
        assert r["risk_level"] in ("LOW", "MEDIUM", "HIGH")
        datetime.fromisoformat(r["timestamp"])
    assert doc["model"]["model_path"] == str(trained_model)


def test_predict_main_all_good_returns_0(trained_model, good_files, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for p in good_files:
        (folder / p.name).symlink_to(p)
    out = tmp_path / "pred.json"
    assert predict(trained_model, "--image_dir", folder, "--output_path", out) == 0
    doc = json.loads(out.read_text())
    assert len(doc["results"]) == len(good_files) and doc["errors"] == []
    assert {r["image_path"] for r in doc["results"]} == {str(folder / p.name) for p in good_files}


def test_predict_main_single_image_to_stdout(trained_model, good_files, capsys):
    assert predict(trained_model, "--image_path", good_files[0]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["image_path"] for r in doc["results"]] == [str(good_files[0])] and doc["errors"] == []


def test_predict_main_single_bad_image_returns_1(trained_model, tmp_path, make_bad_files):
    bad = make_bad_files(tmp_path / "bad")
    out = tmp_path / "pred.json"
    assert predict(trained_model, "--image_path", bad["truncated"], "--output_path", out) == 1
    doc = json.loads(out.read_text())
    assert doc["results"] == [] and len(doc["errors"]) == 1


def test_predict_main_missing_image_returns_2(trained_model, tmp_path):
    out = tmp_path / "pred.json"
    assert predict(trained_model, "--image_path", tmp_path / "missing.jpeg", "--output_path", out) == 2
    assert not out.exists()


def test_predict_main_bad_model_or_folder_returns_2(trained_model, good_files, tmp_path):
    assert predict(tmp_path / "missing.pth", "--image_path", good_files[0]) == 2
    assert predict(trained_model, "--image_dir", tmp_path / "no_such_dir") == 2
    (tmp_path / "empty_dir").mkdir()
    assert predict(trained_model, "--image_dir", tmp_path / "empty_dir") == 2


# --- the evaluate CLI ------------------------------------------------------------------------------


@pytest.fixture
def labelled_folder(tmp_path, fullres_dir):
    folder = tmp_path / "labelled"
    for cls in ("NORMAL", "PNEUMONIA"):
        (folder / cls).mkdir(parents=True)
        for p in sorted((fullres_dir / cls).iterdir())[:6]:
            (folder / cls / p.name).symlink_to(p)
    return folder


def evaluate(model, folder, out, *extra) -> int:
    return evaluate_main(["--model_path", str(model), "--data_dir", str(folder), "--output_path", str(out),
                          "--n_boot", "50", "--cache_dir", "none", "--device", "cpu", *extra])


def test_evaluate_main_writes_metrics(trained_model, labelled_folder, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert evaluate(trained_model, labelled_folder, out) == 0
    report = json.loads(out.read_text())
    assert report["n"] == 12 and report["n_positive"] == 6
    assert report["class_counts"] == {"NORMAL": 6, "PNEUMONIA": 6}
    assert set(report["metrics"]) == set(METRIC_NAMES)
    for m in report["metrics"].values():
        assert set(m) == {"value", "ci_low", "ci_high"}
    assert sum(report["confusion"].values()) == 12
    assert report["threshold"] == pytest.approx(load_checkpoint(trained_model)["threshold"])
    assert report["skipped_files"] == []
    assert "auroc" in capsys.readouterr().out

    # the numbers agree with what the inference engine predicts for the same files
    engine = MedicalImageInference(trained_model, device="cpu", gate=False)  # evaluate has no gate either
    files = sorted(labelled_folder.rglob("*.jpeg"))
    results = engine.predict_batch(files)
    y = np.array([int(f.parent.name == "PNEUMONIA") for f in files])
    p = np.array([r.probabilities["PNEUMONIA"] for r in results])
    expected = binary_metrics(y, p, engine.threshold)
    assert report["metrics"]["accuracy"]["value"] == pytest.approx(expected["accuracy"])
    assert report["metrics"]["auroc"]["value"] == pytest.approx(expected["auroc"], abs=1e-6)


def test_evaluate_warns_when_a_class_has_too_few_patients_for_an_interval(trained_model, fullres_dir, tmp_path,
                                                                          capsys):
    folder = tmp_path / "one_patient"
    for cls in ("NORMAL", "PNEUMONIA"):
        (folder / cls).mkdir(parents=True)
    for p in sorted((fullres_dir / "NORMAL").iterdir())[:6]:
        (folder / "NORMAL" / p.name).symlink_to(p)
    for i, p in enumerate(sorted((fullres_dir / "PNEUMONIA").iterdir())[:4], 1):  # four films of one child
        (folder / "PNEUMONIA" / f"person9999_bacteria_{i}.jpeg").symlink_to(p)
    assert evaluate(trained_model, folder, tmp_path / "e.json", "--model_only") == 0
    err = capsys.readouterr().err
    assert "the pneumonia films come from 1 patient(s)" in err
    assert "the normal films come from" not in err  # six patients: enough
    named = err.split("the 95 % intervals of ")[1].split(" resample patients")[0].split(", ")
    # every metric that reads the pneumonia films, by the names the table prints (it said "precision", no metric)
    assert named == ["sensitivity", "accuracy", "ppv", "npv", "f1", "auroc"]


def test_evaluate_main_with_an_unreadable_file_returns_1(trained_model, labelled_folder, tmp_path, make_bad_files,
                                                         capsys):
    bad = make_bad_files(labelled_folder / "NORMAL")
    out = tmp_path / "eval.json"
    assert evaluate(trained_model, labelled_folder, out) == 1
    report = json.loads(out.read_text())
    assert sorted(s["path"] for s in report["skipped_files"]) == sorted(str(p) for p in bad.values())
    assert report["n"] == 12
    out = capsys.readouterr().out  # beside the table
    assert f"left out: {len(bad)} file(s), in none of the numbers above ({len(bad)} unreadable:" in out


def test_evaluate_says_which_left_out_films_were_laterals_or_another_modality(trained_model, labelled_folder,
                                                                               tmp_path, capsys):
    pytest.importorskip("pydicom")
    from dicom_files import dicom_bytes

    film = np.asarray(Image.open(sorted((labelled_folder / "NORMAL").iterdir())[0]).convert("L"))
    dicom_bytes(labelled_folder / "NORMAL", film, filename="side.dcm", ViewPosition="LL")
    dicom_bytes(labelled_folder / "NORMAL", film, filename="ct.dcm", Modality="CT")
    assert evaluate(trained_model, labelled_folder, tmp_path / "e.json", "--model_only") == 1
    assert ("left out: 2 file(s), in none of the numbers above (1 not frontal, 1 out of scope: ct.dcm, side.dcm;"
            in capsys.readouterr().out)


def test_evaluate_main_on_a_folder_without_classes_returns_2(trained_model, tmp_path):
    (tmp_path / "nothing").mkdir()
    assert evaluate(trained_model, tmp_path / "nothing", tmp_path / "eval.json") == 2


def test_heatmap_data_uri_from_bytes_never_logs_the_bytes(engine, good_files, caplog):
    uri = engine.heatmap_data_uri(good_files[0].read_bytes())
    assert uri is not None and uri.startswith("data:image/png;base64,")
    assert engine.heatmap_data_uri(b"PatientName^Jane " * 20) is None  # not an image
    assert "<bytes>" in caplog.text and "Jane" not in caplog.text


def test_decode_threads_are_reused_across_calls(engine, good_files):
    engine.predict_batch(good_files[:2])
    pool = engine._pool
    engine.predict_batch(good_files[2:4])
    assert pool is not None and engine._pool is pool


def test_an_unexpected_error_on_one_film_fails_that_film_only(train_dir, monkeypatch):
    films = sorted((train_dir / "PNEUMONIA").glob("*.jpeg"))[:3]
    engine = MedicalImageInference(backend="torch")
    spec_type = type(engine.predictor.spec)
    real = spec_type.pixels
    seen = []

    def pixels(self, gray):
        seen.append(gray.size)
        if len(seen) == 2:  # the second film runs out of memory, say
            raise MemoryError("cannot allocate")
        return real(self, gray)

    monkeypatch.setattr(spec_type, "pixels", pixels)
    engine.decode_workers = 0
    outcomes = list(engine.iter_predict(films))
    assert [type(o).__name__ for o in outcomes] == ["InferenceResult", "InferenceFailure", "InferenceResult"]
    assert "unexpected error while preparing" in outcomes[1].error and "MemoryError" in outcomes[1].error


def test_a_model_output_that_is_not_finite_is_no_answer_and_the_batch_goes_on(nan_model, smoke_files):
    from pneumoscan.errors import InferenceError

    engine = MedicalImageInference(str(nan_model), device="cpu", backend="torch")
    films = smoke_files["NORMAL"][:2] + smoke_files["PNEUMONIA"][:1]
    outcomes = engine.predict_batch([*films, films[0].parent / "missing.jpeg"])
    assert [type(o).__name__ for o in outcomes] == ["InferenceFailure"] * 4  # before: NORMAL, with NaN confidence
    assert {o.error_type for o in outcomes[:3]} == {"InferenceError"} and outcomes[3].error_type == "ImageError"
    assert all("not finite" in o.error for o in outcomes[:3])
    with pytest.raises(InferenceError, match="not finite"):
        engine.predict_image(films[0])
