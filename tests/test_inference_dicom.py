"""DICOM through the prediction entry points: same answer as the PNG of the same pixels; refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscan.cli import predict_main
from pneumoscan.inference import InferenceFailure, MedicalImageInference

pytest.importorskip("pydicom")
from dicom_files import dicom_bytes  # noqa: E402

TRAIN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chest_xray" / "train"
pytestmark = pytest.mark.skipif(not TRAIN.is_dir(), reason=f"real chest X-rays not found at {TRAIN}")


@pytest.fixture(scope="module")
def engine() -> MedicalImageInference:
    return MedicalImageInference()


@pytest.fixture(params=["NORMAL", "PNEUMONIA"])
def pixels(request) -> np.ndarray:
    path = sorted((TRAIN / request.param).glob("*.jpeg"))[3]
    return np.asarray(Image.open(path).convert("L"))


ENCODINGS = {
    "mono2_8bit": lambda p: (p, {}),
    "mono1_8bit": lambda p: (255 - p, {"photometric": "MONOCHROME1"}),
    "12bit_window": lambda p: (p.astype(np.uint16) * 16, {"bits_stored": 12, "WindowCenter": 2040,
                                                          "WindowWidth": 4080}),
    "16bit_rescale": lambda p: (p.astype(np.uint16) * 128 + 512, {"RescaleSlope": 2, "RescaleIntercept": -1024,
                                                                   "WindowCenter": 32640, "WindowWidth": 65280}),
}


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_dicom_gives_same_prediction_as_png(engine, tmp_path, pixels, encoding):
    stored, attrs = ENCODINGS[encoding](pixels)
    dcm = tmp_path / "dicom"
    dcm.mkdir()
    dicom_bytes(dcm, stored, filename="image.dcm", ViewPosition="PA", **attrs)
    png = tmp_path / "image.png"
    Image.fromarray(pixels).save(png)
    from_dicom = engine.predict_image(dcm / "image.dcm")
    from_png = engine.predict_image(png)
    assert from_dicom.prediction == from_png.prediction
    assert from_dicom.probabilities["PNEUMONIA"] == pytest.approx(from_png.probabilities["PNEUMONIA"], abs=1e-6)
    assert from_dicom.view_position == "PA"


def test_folder_with_extensionless_dicom_ct_and_empty_dicom(engine, tmp_path, pixels):
    dicom_bytes(tmp_path, pixels, filename="IM0001")
    dicom_bytes(tmp_path, pixels, filename="ct.dcm", Modality="CT")
    dicom_bytes(tmp_path, pixels, filename="nopixels.dcm", drop=("PixelData",))
    dicom_bytes(tmp_path, pixels, filename="lateral.dcm", ViewPosition="LATERAL")
    (tmp_path / "notes.txt").write_text("not an image")
    out = tmp_path / "r.json"
    assert predict_main(["--image_dir", str(tmp_path), "--output_path", str(out)]) == 1
    doc = json.loads(out.read_text())
    by_name = {Path(e["image_path"]).name: e for e in doc["results"] + doc["errors"]}
    assert set(by_name) == {"IM0001", "ct.dcm", "nopixels.dcm", "lateral.dcm"}
    assert "CT" in by_name["ct.dcm"]["error"] and by_name["ct.dcm"]["error_type"] == "OutOfScopeError"
    assert "PixelData" in by_name["nopixels.dcm"]["error"]
    assert "prediction" in by_name["IM0001"]
    lateral = by_name["lateral.dcm"]
    assert lateral.get("view_position") == "LATERAL" or "LATERAL" in lateral.get("error", "")
    assert "prediction" in lateral  # a frontal film's pixels: answered, with the view's warning
    assert sum("lateral" in w.lower() for w in lateral["warnings"]) == 1, lateral["warnings"]  # said once
    assert lateral["risk_level"] == "HIGH"


def test_patient_identifiers_never_logged(engine, tmp_path, pixels, caplog):
    dicom_bytes(tmp_path, pixels, filename="ct.dcm", Modality="CT")
    outcome = engine.predict_batch([tmp_path / "ct.dcm"])[0]
    assert isinstance(outcome, InferenceFailure)
    for secret in ("Doe^Jane", "PID-93417", "19610423"):
        assert secret not in caplog.text and secret not in outcome.error


def test_a_colour_dicom_is_refused_as_the_same_colour_png_is(engine, tmp_path, pixels):
    # a photo-like colour image: the colour check reads the DICOM's pixels as it reads a PNG's
    rgb = np.stack([pixels, np.roll(pixels, 40, axis=1), 255 - pixels], axis=-1).astype(np.uint8)
    png = tmp_path / "colour.png"
    Image.fromarray(rgb).save(png)
    dicom_bytes(tmp_path, rgb, filename="colour.dcm", photometric="RGB", ViewPosition="PA")
    from_png, from_dicom = engine.predict_batch([png, tmp_path / "colour.dcm"])
    assert isinstance(from_png, InferenceFailure) and "colour image" in from_png.error
    assert isinstance(from_dicom, InferenceFailure) and "colour image" in from_dicom.error


@pytest.mark.parametrize("implicit", [False, True])
def test_a_dicom_without_its_preamble_is_read_not_skipped(engine, tmp_path, pixels, implicit):
    import io as _io

    import pydicom
    from pydicom.dataset import FileMetaDataset

    ds = pydicom.dcmread(_io.BytesIO(dicom_bytes(tmp_path, pixels, ViewPosition="PA")))
    ds.preamble = None
    if implicit:  # no file meta at all, as some old systems write
        ds.file_meta = FileMetaDataset()
    folder = tmp_path / "bare"
    folder.mkdir()
    buf = _io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=False, implicit_vr=implicit, little_endian=True)
    (folder / "IMG0001").write_bytes(buf.getvalue())  # extension-less, as PACS folders have them
    (folder / "b.dcm").write_bytes(buf.getvalue())
    png = tmp_path / "same.png"
    Image.fromarray(pixels).save(png)
    reference = engine.predict_image(png)
    out = tmp_path / "r.json"
    assert predict_main(["--image_dir", str(folder), "--output_path", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert sorted(Path(r["image_path"]).name for r in results) == ["IMG0001", "b.dcm"]
    for r in results:
        assert r["probabilities"]["PNEUMONIA"] == pytest.approx(reference.probabilities["PNEUMONIA"], abs=1e-6)
        assert any("without the 128-byte preamble" in w for w in r["warnings"])


def test_predict_echoes_no_dicom_text_that_is_not_a_defined_term(tmp_path, pixels, capsys, caplog):
    # a site that typed the patient into ViewPosition and BodyPartExamined: the CLI's output says only that the
    # values are unrecognised, as the service does
    dicom_bytes(tmp_path, pixels, filename="typed.dcm", ViewPosition="MUELLER HANS", BodyPartExamined="PID12345 KNEE")
    out = tmp_path / "r.json"
    assert predict_main(["--image_path", str(tmp_path / "typed.dcm"), "--output_path", str(out)]) == 0
    result = json.loads(out.read_text())["results"][0]
    assert result["view_position"] == "unrecognised"
    assert "view position is an unrecognised value, not frontal (PA/AP)" in " ".join(result["warnings"])
    assert "body part examined is an unrecognised value, not CHEST" in result["warnings"]
    printed = capsys.readouterr()
    for typed in ("MUELLER", "HANS", "PID12345"):
        for where, text in (("output", out.read_text()), ("stdout", printed.out), ("stderr", printed.err),
                            ("log", caplog.text)):
            assert typed not in text, f"{typed} in the {where}"
