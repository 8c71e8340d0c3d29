"""Which patient a labelled film belongs to: DICOM PatientID, a ``--patients`` CSV, the Kermany names.

Patient-level CIs, folds and the site-calibration estimate resample or deal *patients*; a patient whose
films count as several makes them optimistic. Real films, written as real DICOM files where needed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from dicom_files import IDENTIFIERS, dicom_bytes
from PIL import Image

from pneumoscan.cli import EXIT_BAD_INPUT, EXIT_SOME_FAILED, calibrate_main, evaluate_main, train_main
from pneumoscan.data import (
    CLASS_NAMES,
    assign_patients,
    discover_labelled,
    load_labelled_folder,
    prepare_data,
    read_patients_csv,
)
from pneumoscan.errors import DataError
from pneumoscan.site_calibration import format_site_report


def _films(train_dir: Path, cls: str, n: int) -> list[Path]:
    return sorted((train_dir / cls).iterdir())[:n]


@pytest.fixture(scope="module")
def dicom_folder(tmp_path_factory, train_dir) -> Path:
    """Real films as DICOM files: NORMAL/ holds 3 films of one patient, 1 without a PatientID, and a
    lateral; PNEUMONIA/ 4 films of 4 patients (one file without an extension)."""
    root = tmp_path_factory.mktemp("dicom_site")
    for cls in CLASS_NAMES:
        (root / cls).mkdir()
    pixels = [np.asarray(Image.open(p).convert("L")) for p in _films(train_dir, "NORMAL", 5)]
    for i in range(3):
        dicom_bytes(root / "NORMAL", pixels[i], filename=f"n{i}.dcm", PatientID="MRN-0001", ViewPosition="PA")
    dicom_bytes(root / "NORMAL", pixels[3], filename="anon.dcm", drop=("PatientID",))
    dicom_bytes(root / "NORMAL", pixels[4], filename="side.dcm", PatientID="MRN-0002", ViewPosition="LL")
    for i, p in enumerate(_films(train_dir, "PNEUMONIA", 4)):
        name = "p3" if i == 3 else f"p{i}.dcm"  # a DICOM file without an extension counts too
        dicom_bytes(root / "PNEUMONIA", np.asarray(Image.open(p).convert("L")), filename=name,
                    PatientID=f"MRN-1{i:03d}", ViewPosition="AP")
    return root


def test_labelled_dicom_films_are_grouped_by_patient_id_which_never_appears(dicom_folder, caplog):
    with caplog.at_level(logging.DEBUG):
        data, bad = load_labelled_folder(str(dicom_folder), 224, cache_dir="none")
    by_name = {Path(p).name: pt for p, pt in zip(data.paths, data.patients)}
    assert set(by_name) == {"n0.dcm", "n1.dcm", "n2.dcm", "anon.dcm", "p0.dcm", "p1.dcm", "p2.dcm", "p3"}
    assert by_name["n0.dcm"] == by_name["n1.dcm"] == by_name["n2.dcm"] != by_name["p0.dcm"]
    assert by_name["anon.dcm"] == "anon"  # no PatientID: the file-name rule (its own patient)
    assert len(set(data.patients)) == 6 and data.class_counts() == {"NORMAL": 4, "PNEUMONIA": 4}
    # the lateral film is left out, with the reason
    assert [(Path(p).name, "lateral view (DICOM ViewPosition LL)" in r) for p, r in bad] == [("side.dcm", True)]
    shown = repr(data.patients) + caplog.text + repr(bad)
    assert all(p.startswith("dicom:") for p in data.patients if p != "anon")
    for secret in ("MRN-", IDENTIFIERS["PatientName"], IDENTIFIERS["PatientBirthDate"]):
        assert secret not in shown


def test_evaluate_on_a_labelled_dicom_folder_resamples_patients(dicom_folder, tmp_path, capsys):
    out = tmp_path / "m.json"
    code = evaluate_main(["--data_dir", str(dicom_folder), "--output_path", str(out), "--n_boot", "50",
                          "--cache_dir", "none"])
    report = json.loads(out.read_text())
    assert code == EXIT_SOME_FAILED and report["patients"] == 6  # the lateral is skipped: some failed
    assert report["class_counts"] == {"NORMAL": 4, "PNEUMONIA": 4}
    assert [Path(s["path"]).name for s in report["skipped_files"]] == ["side.dcm"]
    assert "8 films of 6 patients" in capsys.readouterr().out


def _csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture()
def jpeg_folder(tmp_path, train_dir) -> Path:
    """Two real films per class, copied as film0.jpeg and film1.jpeg into both class folders."""
    root = tmp_path / "site"
    for cls in CLASS_NAMES:
        (root / cls).mkdir(parents=True)
        for i, p in enumerate(_films(train_dir, cls, 2)):
            (root / cls / f"film{i}.jpeg").write_bytes(p.read_bytes())
    return root


def test_patients_csv_groups_films_by_path_or_unique_name(jpeg_folder, tmp_path):
    rows = read_patients_csv(_csv(tmp_path / "p.csv", "\ufeffFile,Patient,age\nNORMAL/film0.jpeg,A,3\n"
                                  "NORMAL/film1.jpeg,A,3\n\n./PNEUMONIA/film0.jpeg,B,4\n"
                                  f"{jpeg_folder}/PNEUMONIA/film1.jpeg,C,5\nother/film9.jpeg,D,1\n"))
    assert rows[0] == ("NORMAL/film0.jpeg", "A") and len(rows) == 5  # BOM, case, extra column, blank line
    data, bad = load_labelled_folder(str(jpeg_folder), 224, cache_dir="none", patients_csv=str(tmp_path / "p.csv"))
    got = {Path(p).parent.name + "/" + Path(p).name: pt for p, pt in zip(data.paths, data.patients)}
    assert got == {"NORMAL/film0.jpeg": "csv:A", "NORMAL/film1.jpeg": "csv:A",
                   "PNEUMONIA/film0.jpeg": "csv:B", "PNEUMONIA/film1.jpeg": "csv:C"} and not bad
    # without the CSV the file-name rule groups by stem (the same name in both class folders: one patient)
    plain, _ = load_labelled_folder(str(jpeg_folder), 224, cache_dir="none")
    assert plain.patients == ["film0", "film1", "film0", "film1"]


@pytest.mark.parametrize("text, message", [
    ("name,id\nNORMAL/film0.jpeg,A\n", "must be the header file,patient (found the columns name, id)"),
    ("file;patient\nNORMAL/film0.jpeg;A\n", "it holds ';': separate the columns with commas"),
    ("file,patient\nNORMAL/film0.jpeg,\n", "line 2: empty patient"),
    ("file,patient\n", "no rows after the header"),
    ("file,patient\nfilm0.jpeg,A\n", "'film0.jpeg' matches 2 files (NORMAL/film0.jpeg, PNEUMONIA/film0.jpeg)"),
    ("file,patient\nNORMAL/film0.jpeg,A\nNORMAL/film0.jpeg,B\n", "NORMAL/film0.jpeg is given two different"),
    ("file,patient\nNORMAL/film0.jpeg,A\nNORMAL/film1.jpeg,A\nPNEUMONIA/film0.jpeg,B\nPNEUMONIA/Film1.jpeg,C\n",
     "1 row(s) name no film here, e.g. 'PNEUMONIA/Film1.jpeg' (paths are below"),
    ("file,patient\nNORMAL/film0.jpeg,A\nNORMAL/film1.jpeg,A\nPNEUMONIA/film0.jpeg,B\n",
     "1 of 4 films have no row, e.g. PNEUMONIA/film1.jpeg"),
])
def test_a_patients_csv_that_does_not_fit_the_films_is_refused_with_what_to_fix(jpeg_folder, tmp_path, text,
                                                                                message):
    records = discover_labelled(jpeg_folder)
    with pytest.raises(DataError) as exc:
        assign_patients(records, read_patients_csv(_csv(tmp_path / "p.csv", text)), jpeg_folder)
    assert message in str(exc.value)
    assert "csv:" not in repr([r.patient for r in records])  # nothing half-assigned


def test_calibrate_with_an_incomplete_patients_csv_stops_before_any_work(jpeg_folder, tmp_path, capsys):
    out = tmp_path / "site.pth"
    bad = _csv(tmp_path / "p.csv", "file,patient\nNORMAL/film0.jpeg,A\n")
    code = calibrate_main(["--data_dir", str(jpeg_folder), "--output_path", str(out), "--patients", str(bad),
                           "--cache_dir", "none"])
    assert code == EXIT_BAD_INPUT and not out.exists()
    assert "3 of 4 films have no row" in capsys.readouterr().err
    missing = tmp_path / "none.csv"
    assert evaluate_main(["--data_dir", str(jpeg_folder), "--patients", str(missing)]) == EXIT_BAD_INPUT
    assert f"--patients {missing}: cannot read it" in capsys.readouterr().err


def test_site_report_spread_leaves_out_groups_without_the_class():
    def group(sens, spec, pneumonia, normal):
        return {"sensitivity": sens, "specificity": spec, "pneumonia": pneumonia, "normal": normal}

    record = {"site": "s", "films": 9, "patients": 5, "class_counts": {"NORMAL": 4, "PNEUMONIA": 5},
              "target_sensitivity": 0.95, "temperature": 1.0, "threshold": 0.5,
              "previous": {"temperature": None, "threshold": 0.5},
              "stored_operating_point_on_site": {"ece_15": 0.1, "metrics": {
                  k: {"value": 0.9, "ci_low": 0.8, "ci_high": 1.0} for k in ("sensitivity", "specificity", "auroc")}},
              "refitted_cross_validated": {"folds": 3, "sensitivity": 0.9, "specificity": 0.8, "ece": 0.05,
                                           "per_fold": [group(0.8, 1.0, 3, 2), group(0.0, 0.6, 0, 2),
                                                        group(1.0, 0.0, 2, 0)]}}
    row = format_site_report(record).splitlines()[5]
    # the group without pneumonia films has no sensitivity, the one without normals no specificity
    assert "0.900 (0.800-1.000)" in row and "0.800 (0.600-1.000)" in row
    record["refitted_cross_validated"]["per_fold"] = [group(0.0, 1.0, 0, 2)]
    assert "0.900 (n/a)" in format_site_report(record).splitlines()[5]


@pytest.fixture()
def anonymous_root(tmp_path, train_dir) -> tuple[Path, Path]:
    """A data set root of 24 real films per class under names that say nothing of the patient, and a CSV
    giving them to 8 patients per class (3 films each)."""
    root = tmp_path / "data"
    rows = ["file,patient"]
    for cls in CLASS_NAMES:
        (root / "train" / cls).mkdir(parents=True)
        for i, p in enumerate(_films(train_dir, cls, 24)):
            (root / "train" / cls / f"{cls[0]}{i:02d}.jpeg").write_bytes(p.read_bytes())
            rows.append(f"train/{cls}/{cls[0]}{i:02d}.jpeg,{cls}-{i // 3}")
    return root, _csv(tmp_path / "patients.csv", "\n".join(rows) + "\n")


def test_training_splits_and_folds_keep_each_csv_patient_on_one_side(anonymous_root):
    root, csv_path = anonymous_root

    def sides(splits) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for side in ("train", "val"):
            for path in getattr(splits, side).paths:
                stem = Path(path).stem
                out.setdefault(f"{stem[0]}{int(stem[1:]) // 3}", set()).add(side)
        return out

    plain = prepare_data(str(root), 32, val_fraction=0.25, cache_dir="none")
    assert len(set(plain.train.patients) | set(plain.val.patients)) == 48  # each file its own patient
    assert any(len(s) == 2 for s in sides(plain).values())  # ... so one patient's films straddle the split
    for kwargs in ({}, {"cv_folds": 3, "cv_fold": 1}):
        splits = prepare_data(str(root), 32, val_fraction=0.25, cache_dir="none", patients_csv=str(csv_path),
                              **kwargs)
        assert len(set(splits.train.patients) | set(splits.val.patients)) == 16
        assert all(len(s) == 1 for s in sides(splits).values()), kwargs  # never straddle


def test_train_with_a_patients_csv_that_misses_films_stops_before_training(anonymous_root, tmp_path, capsys):
    root, csv_path = anonymous_root
    lines = csv_path.read_text().splitlines()
    short = _csv(tmp_path / "short.csv", "\n".join(lines[:-2]) + "\n")
    out = tmp_path / "run"
    assert train_main(["--data_dir", str(root), "--output_dir", str(out), "--patients", str(short),
                       "--epochs", "1", "--cache_dir", "none"]) == EXIT_BAD_INPUT
    assert "2 of 48 films have no row" in capsys.readouterr().err and not (out / "medical_cnn_model.pth").exists()


def test_in_use_counts_refusals_and_low_risk_errors_by_true_class():
    from pneumoscan.inference import InferenceFailure, InferenceResult
    from pneumoscan.scope_report import format_in_use, in_use_report

    def answer(pred, risk, warnings=()):
        return InferenceResult(prediction=pred, confidence=0.9, probabilities={}, risk_level=risk, uncertainty=0.1,
                               processing_time=0.0, timestamp="", warnings=list(warnings))

    refused = InferenceFailure("x", "out of scope: looks like a radiograph of another body part", "OutOfScopeError")
    unreadable = InferenceFailure("y", "file is empty (0 bytes)", "ImageError")
    outcomes = [answer("NORMAL", "LOW"), answer("PNEUMONIA", "LOW"), refused,  # NORMAL films
                answer("PNEUMONIA", "LOW"), answer("NORMAL", "LOW"), answer("NORMAL", "MEDIUM"),  # PNEUMONIA
                answer("PNEUMONIA", "HIGH", ["outside the validated population: an adult film?"]), unreadable]
    r = in_use_report(outcomes, [0, 0, 0, 1, 1, 1, 1, 1])
    assert (r["films"], r["refused"], r["unreadable"], r["answered"]) == (8, 1, 1, 6)
    assert r["refused_by_class"] == {"NORMAL": 1, "PNEUMONIA": 0} and r["refused_by_reason"] == {"other_body": 1}
    assert r["unreadable_by_class"] == {"NORMAL": 0, "PNEUMONIA": 1}
    assert r["answered_by_class"] == {"NORMAL": 2, "PNEUMONIA": 4}
    assert r["answered_sensitivity"] == 2 / 4 and r["answered_specificity"] == 1 / 2
    assert r["wrong_with_low_risk_by_class"] == {"NORMAL": 1, "PNEUMONIA": 1} and r["wrong_with_low_risk"] == 2
    assert r["answered_with_lateral_or_population_warning"] == 1
    text = format_in_use(r)
    assert "wrong with LOW risk: 2 (1 NORMAL called PNEUMONIA, 1 PNEUMONIA called NORMAL)" in text
    assert "refused 1 (1 NORMAL, 0 PNEUMONIA; by reason: other_body 1), unreadable 1, answered 6" in text
    assert "sensitivity 2/4 = 0.500 [" in text and "specificity 1/2 = 0.500 [" in text
    only_normals = in_use_report([refused, answer("NORMAL", "LOW")], [1, 0])
    assert "sensitivity n/a (none answered)" in format_in_use(only_normals)
    with pytest.raises(ValueError):
        in_use_report(outcomes, [0, 1])


DEV_SHIFT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dev_shift"


@pytest.mark.skipif(not DEV_SHIFT.is_dir(), reason=f"dev_shift films not found at {DEV_SHIFT}")
def test_evaluate_reports_what_the_pipeline_refuses_among_labelled_films(tmp_path, train_dir, capsys):
    """Radiographs of other body parts filed as NORMAL by mistake: the model-only metrics score them,
    the in-use counts show they would get no answer."""
    root = tmp_path / "site"
    for cls in CLASS_NAMES:
        (root / cls).mkdir(parents=True)
        for p in _films(train_dir, cls, 8):
            (root / cls / p.name).write_bytes(p.read_bytes())
    knees = sorted((DEV_SHIFT / "other_radiographs").glob("other_radiographs_kneeoa_*"))[:4]
    for p in knees:
        (root / "NORMAL" / p.name).write_bytes(p.read_bytes())
    out, page = tmp_path / "m.json", tmp_path / "r.html"
    assert evaluate_main(["--data_dir", str(root), "--output_path", str(out), "--n_boot", "20", "--report",
                          str(page)]) == 0
    report = json.loads(out.read_text())
    use = report["in_use"]
    refused = {Path(r["path"]).name: r["reason"] for r in use["refused_files"]}
    assert len(refused) == use["refused"] and {refused[p.name] for p in knees if p.name in refused} == {"other_body"}
    # the report's galleries say which confident errors would have been refused in use
    html_text = page.read_text()
    shown_knees = [p.name for p in knees if p.name in html_text and p.name in refused]
    assert html_text.count("<b>refused in use</b> (other_body)") >= len(shown_knees) >= 1
    assert report["n"] == use["films"] == 20 and use["refused"] + use["answered"] == 20
    assert use["refused_by_class"]["NORMAL"] >= 3 and use["refused_by_reason"].get("other_body", 0) >= 3
    assert use["refused_by_class"]["PNEUMONIA"] <= 1
    assert "in use (the whole pipeline, scope checks included, backend torch): 20 films" in capsys.readouterr().out
    assert evaluate_main(["--data_dir", str(root), "--output_path", str(out), "--n_boot", "20", "--model_only"]) == 0
    assert "in_use" not in json.loads(out.read_text())


def test_rows_must_name_the_file_itself_not_a_namesake_in_another_split(tmp_path, train_dir):
    """train/ and test/ holding the same names: a row for train/NORMAL/a.jpeg never names test/NORMAL/a.jpeg."""
    root = tmp_path / "data"
    for split in ("train", "test"):
        for cls in CLASS_NAMES:
            (root / split / cls).mkdir(parents=True)
            for i, p in enumerate(_films(train_dir, cls, 2)):
                (root / split / cls / f"f{i}.jpeg").write_bytes(p.read_bytes())
    test = root / "test"
    records = discover_labelled(test)
    train_rows = [(f"train/{c}/f{i}.jpeg", f"{c}{i}") for c in CLASS_NAMES for i in range(2)]
    with pytest.raises(DataError, match="4 of 4 films have no row.*4 row\\(s\\) name no film here"):
        assign_patients(records, train_rows, test)
    elsewhere = [(f"/somewhere/else/{c}/f{i}.jpeg", "X") for c in CLASS_NAMES for i in range(2)]
    with pytest.raises(DataError, match="4 of 4 films have no row"):
        assign_patients(records, elsewhere, test)
    # the forms that do name these films: below the folder, with the folder's own name, absolute, Windows-style
    rows = [("NORMAL/f0.jpeg", "a"), ("test/NORMAL/f1.jpeg", "b"), (str(test / "PNEUMONIA" / "f0.jpeg"), "c"),
            ("C:\\data\\test\\PNEUMONIA\\f1.jpeg", "d"), ("./NORMAL/../NORMAL/f0.jpeg", "a")]
    assign_patients(records, rows, test)
    assert [r.patient for r in records] == ["csv:a", "csv:b", "csv:c", "csv:d"]


def test_a_csv_without_header_never_shows_its_cells(anonymous_root, tmp_path, capsys):
    root, csv_path = anonymous_root
    headless = _csv(tmp_path / "h.csv", "\n".join(csv_path.read_text().splitlines()[1:]).replace(
        "NORMAL-0", "MRN-7654321") + "\n")
    out = tmp_path / "run"
    assert train_main(["--data_dir", str(root), "--output_dir", str(out), "--patients", str(headless),
                       "--epochs", "1", "--cache_dir", "none"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "the first line must be the header file,patient" in err and "not shown" in err
    logs = "".join(p.read_text() for p in out.glob("*.log")) if out.exists() else ""
    assert "MRN-7654321" not in err + logs and "train/NORMAL/N00.jpeg" not in err


def test_a_changed_patients_csv_cannot_rebuild_the_split(anonymous_root):
    from pneumoscan.config import TrainConfig
    from pneumoscan.data import file_sha256, split_from_config
    from pneumoscan.errors import CheckpointError
    from pneumoscan.train import _check_resume

    root, csv_path = anonymous_root
    pinned = {"patients_csv": str(csv_path), "patients_csv_sha256": file_sha256(csv_path), "val_fraction": 0.25}
    assert len(set(split_from_config(pinned, str(root), 32, cache_dir="none").val.patients)) == 4
    csv_path.write_text(csv_path.read_text().replace("NORMAL-0\n", "NORMAL-1\n"))
    with pytest.raises(DataError, match="has changed since the model was trained"):
        split_from_config(pinned, str(root), 32, cache_dir="none")
    cfg = TrainConfig(data_dir=str(root), patients_csv=str(csv_path), patients_csv_sha256=file_sha256(csv_path))
    with pytest.raises(CheckpointError, match="patients_csv_sha256"):
        _check_resume({"config": pinned}, cfg)


def test_patients_that_look_wrong_are_warned_about(caplog):
    from pneumoscan.data import Record, check_patients

    one = [Record(Path(f"/d/NORMAL/{i}.dcm"), 0, "dicom:0123456789abcdef") for i in range(20)]
    none = [Record(Path(f"/d/NORMAL/{i}.dcm"), 0, str(i)) for i in range(3)]
    with caplog.at_level(logging.WARNING):
        check_patients(one + [Record(Path(f"/d/PNEUMONIA/p{i}.jpeg"), 1, f"p{i}") for i in range(10)])
        check_patients(none)
        check_patients([Record(Path(f"/d/NORMAL/{i}.jpeg"), 0, str(i)) for i in range(30)])
    text = caplog.text
    assert "20 of 30 films belong to one patient" in text and "anonymised" in text
    assert "3 DICOM file(s) have no PatientID" in text and text.count("WARNING") == 2
    assert "share a name" not in text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # 0.dcm in both classes: one patient by name, and the warning says so
        check_patients(none + [Record(Path("/d/PNEUMONIA/0.dcm"), 1, "0")])
    assert "(2 of them share a name with another" in caplog.text  # it said "each counts as its own patient"


def test_a_patient_group_without_a_class_stores_no_value_for_it():
    from pneumoscan.site_calibration import _group_point

    y, prob = np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.9, 0.8])
    pred = prob >= 0.5
    no_pneumonia = _group_point(y, prob, pred, np.array([True, True, False, False]), 0, 1.0, 0.5)
    assert no_pneumonia["sensitivity"] is None and no_pneumonia["specificity"] == 1.0
    no_normal = _group_point(y, prob, pred, np.array([False, False, True, True]), 1, 1.0, 0.5)
    assert no_normal["specificity"] is None and no_normal["sensitivity"] == 1.0


@pytest.mark.parametrize("threshold", ["1.5", "0", "-0.2"])
def test_evaluate_refuses_a_threshold_that_is_not_a_probability_before_any_work(jpeg_folder, capsys, threshold):
    assert evaluate_main(["--data_dir", str(jpeg_folder), "--threshold", threshold, "--model_only"]) == EXIT_BAD_INPUT
    assert f"--threshold {float(threshold)}: give a probability between 0 and 1" in capsys.readouterr().err


def test_a_k_fold_run_with_a_patients_csv_reuses_its_finished_folds(anonymous_root, tmp_path, smoke_args):
    root, csv_path = anonymous_root
    out = tmp_path / "cv"
    argv = ["--data_dir", str(root), "--output_dir", str(out), "--patients", str(csv_path), "--cv_folds", "2",
            "--width", "0.25", "--cache_dir", "none", *smoke_args]
    assert train_main(argv) == 0
    assert train_main(argv) == 0  # run again: both folds finished, checked against the same CSV
    assert (out / "training.log").read_text().count("finished earlier") == 2
