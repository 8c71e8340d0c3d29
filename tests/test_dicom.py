"""DICOM reading: real chest X-rays from the training set, wrapped in DICOM files and read back.

Each case stores a real image's 8-bit grayscale pixels ``p`` in a different DICOM encoding
whose display pipeline maps back to ``p``, so ``read_dicom`` must return the source pixels.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from dicom_files import IDENTIFIERS, dicom_bytes
from PIL import Image

from pneumoscan.dicom import DicomInfo, is_dicom, read_dicom
from pneumoscan.errors import ImageError, OutOfScopeError
from pneumoscan.preprocess import open_image

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.pixels import convert_color_space, get_decoder  # noqa: E402
from pydicom.uid import (  # noqa: E402
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    SecondaryCaptureImageStorage,
)

TRAIN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chest_xray" / "train"
pytestmark = pytest.mark.skipif(not TRAIN.is_dir(), reason=f"real chest X-rays not found at {TRAIN}")



def _first_image(label: str) -> Path:
    return sorted((TRAIN / label).glob("*.jpeg"))[0]


@pytest.fixture(params=["NORMAL", "PNEUMONIA"])
def source(request) -> Path:
    return _first_image(request.param)


def _gray(path: Path) -> np.ndarray:
    """The 8-bit grayscale pixels the JPEG path gives for the same file."""
    return np.asarray(open_image(path))


def _refuse(data: bytes, match: str) -> ImageError:
    """read_dicom must refuse ``data`` with a message matching ``match`` and naming no patient."""
    with pytest.raises(ImageError, match=match) as caught:
        read_dicom(data, "upload.dcm")
    message = str(caught.value)
    assert message.startswith("upload.dcm: ")
    assert not [v for v in IDENTIFIERS.values() if v in message], message
    return caught.value


def _assert_private(info: DicomInfo) -> None:
    assert not [v for v in IDENTIFIERS.values() if v in repr(info)], repr(info)


def _voi_lut_12bit() -> list[Dataset]:
    """An 8-bit VOI LUT over stored values 0..4080 that maps p*16 back to p."""
    item = Dataset()
    item.add_new(0x00283002, "US", [4081, 0, 8])  # LUT Descriptor: entries, first value mapped, bits
    item.add_new(0x00283006, "US", [(i + 8) // 16 for i in range(4081)])  # LUT Data
    return [item]


def _encode(case: str, p: np.ndarray) -> tuple[np.ndarray, dict]:
    """Stored pixels and attributes for ``case`` whose display pipeline gives back ``p`` exactly."""
    p16 = p.astype(np.uint16)
    if case == "mono2-8bit":
        return p, {}
    if case == "mono1-8bit":
        return 255 - p, {"photometric": "MONOCHROME1"}
    if case == "12bit-window":
        # p*16 spans 0..4080; a LINEAR window (centre 2040, width 4080) covering exactly that span maps
        # it back to p with no rounding loss (centre 2047.5/width 4096 would give p*255/256, off by 1
        # at the top). Bits 12-15 carry garbage, as overlays do, which Bits Stored 12 must discard.
        stored = p16 * 16 | np.where(np.arange(p.size).reshape(p.shape) % 2, 0xA000, 0).astype(np.uint16)
        return stored, {"bits_stored": 12, "WindowCenter": 2040, "WindowWidth": 4080}
    if case == "12bit-voi-lut":
        return p16 * 16, {"bits_stored": 12, "VOILUTSequence": _voi_lut_12bit()}
    if case == "16bit-rescale-window":
        # slope 2, intercept -1024: 2 * (128 p + 512) - 1024 = 256 p, a 16-bit widening of p; the first
        # window (centre 32640, width 65280) spans 0..255*256 and maps it back; the second is a decoy.
        return p16 * 128 + 512, {"RescaleSlope": 2, "RescaleIntercept": -1024,
                                 "WindowCenter": [32640, 40], "WindowWidth": [65280, 80]}
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["mono2-8bit", "mono1-8bit", "12bit-window", "12bit-voi-lut",
                                  "16bit-rescale-window"])
def test_round_trip_gives_source_pixels(tmp_path, source, case):
    p = _gray(source)
    pixels, attrs = _encode(case, p)
    data = dicom_bytes(tmp_path, pixels, **attrs)
    assert is_dicom(data)

    img, info = read_dicom(data, str(source))

    assert img.mode == "L" and img.size == (p.shape[1], p.shape[0])
    np.testing.assert_array_equal(np.asarray(img), p)
    assert info.modality == "DX" and info.transfer_syntax == "Explicit VR Little Endian"
    assert info.bits_stored == attrs.get("bits_stored", pixels.dtype.itemsize * 8)
    assert info.warnings == [] and not info.is_lateral and info.view_position == ""
    _assert_private(info)


def test_no_window_stretches_min_to_max(tmp_path, source):
    p = _gray(source)
    data = dicom_bytes(tmp_path, p.astype(np.uint16) * 16, bits_stored=12)
    img, _ = read_dicom(data, "x.dcm")
    lo, hi = int(p.min()), int(p.max())
    expected = np.floor((p.astype(np.float64) - lo) / (hi - lo) * 255 + 0.5)
    assert np.abs(np.asarray(img).astype(np.float64) - expected).max() <= 1
    assert np.asarray(img).min() == 0 and np.asarray(img).max() == 255


def test_file_without_extension(tmp_path, source):
    p = _gray(source)
    dicom_bytes(tmp_path, p, filename="IM000001")
    data = (tmp_path / "IM000001").read_bytes()
    assert is_dicom(data)
    img, _ = read_dicom(data, "IM000001")
    np.testing.assert_array_equal(np.asarray(img), p)


def test_is_dicom_false_for_jpeg_and_short_data(source):
    assert not is_dicom(source.read_bytes())
    assert not is_dicom(b"")
    assert not is_dicom(b"DICM")


@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL"])
def test_color_becomes_grayscale(tmp_path, source, photometric):
    rgb = np.asarray(Image.open(source).convert("RGB"))
    stored = rgb if photometric == "RGB" else convert_color_space(rgb, "RGB", "YBR_FULL")
    img, info = read_dicom(dicom_bytes(tmp_path, stored, photometric=photometric), "x.dcm")
    # YBR_FULL is lossy by rounding (PS3.3 C.7.6.3.1.2); its luma is still within 1 of PIL's.
    assert np.abs(np.asarray(img).astype(int) - _gray(source).astype(int)).max() <= 1
    assert info.photometric_interpretation == photometric
    assert any("colour image" in w for w in info.warnings)


def test_jpeg_baseline_encapsulated(tmp_path, source):
    if not get_decoder(JPEGBaseline8Bit).is_available:
        pytest.skip("no JPEG Baseline decoder for pydicom installed")
    with Image.open(source) as jpeg:
        mode, (width, height) = jpeg.mode, jpeg.size
    color = mode != "L"
    shape = (height, width, 3) if color else (height, width)
    data = dicom_bytes(tmp_path, np.zeros(shape, np.uint8), transfer_syntax=JPEGBaseline8Bit,
                        photometric="YBR_FULL_422" if color else "MONOCHROME2",
                        pixel_data=encapsulate([source.read_bytes()]))
    img, info = read_dicom(data, "x.dcm")
    assert np.abs(np.asarray(img).astype(int) - _gray(source).astype(int)).max() <= 1
    assert info.transfer_syntax == JPEGBaseline8Bit.name


def test_multi_frame_uses_first_frame(tmp_path, source):
    p = _gray(source)
    data = dicom_bytes(tmp_path, p, pixel_data=p.tobytes() + (255 - p).tobytes(), NumberOfFrames=2)
    img, info = read_dicom(data, "x.dcm")
    np.testing.assert_array_equal(np.asarray(img), p)
    assert any("first frame" in w for w in info.warnings)


def test_lateral_view(tmp_path, source):
    _, info = read_dicom(dicom_bytes(tmp_path, _gray(source), ViewPosition="LATERAL"), "x.dcm")
    assert info.is_lateral and info.view_position == "LATERAL"
    assert any("lateral" in w for w in info.warnings)


def test_secondary_capture_accepted_with_warning(tmp_path, source):
    data = dicom_bytes(tmp_path, _gray(source), Modality="OT", SOPClassUID=SecondaryCaptureImageStorage)
    img, info = read_dicom(data, "x.dcm")
    np.testing.assert_array_equal(np.asarray(img), _gray(source))
    assert info.modality == "OT" and any("secondary capture" in w for w in info.warnings)
    _assert_private(info)


@pytest.mark.parametrize("modality", ["CT", "MR", "MG"])
def test_other_modalities_refused(tmp_path, source, modality):
    error = _refuse(dicom_bytes(tmp_path, _gray(source), Modality=modality), modality)
    assert "only CR/DX chest radiographs" in str(error)


def test_no_pixel_data_refused(tmp_path, source):
    _refuse(dicom_bytes(tmp_path, _gray(source), drop=("PixelData",)), r"no image \(no PixelData")


def test_undecodable_jpeg2000_names_transfer_syntax(tmp_path, source):
    p = _gray(source)
    data = dicom_bytes(tmp_path, p, transfer_syntax=JPEG2000, pixel_data=encapsulate([b"\xff\x4f garbage" * 64]))
    error = _refuse(data, "JPEG 2000")
    assert JPEG2000 in str(error) and "pip install" in str(error)


def test_non_dicom_bytes_refused(source):
    _refuse(source.read_bytes(), "not a DICOM file")


def test_missing_decoder_names_pip_package(tmp_path, source):
    if get_decoder(JPEGLosslessSV1).is_available:
        pytest.skip("a JPEG Lossless decoder is installed here")
    data = dicom_bytes(tmp_path, _gray(source), transfer_syntax=JPEGLosslessSV1,
                        pixel_data=encapsulate([b"\xff\xd8 not decoded" * 64]))
    error = _refuse(data, "no decoder for it is installed")
    assert JPEGLosslessSV1 in str(error) and "pip install pylibjpeg pylibjpeg-libjpeg" in str(error)


def test_truncated_pixel_data_refused(tmp_path, source):
    p = _gray(source)
    _refuse(dicom_bytes(tmp_path, p, pixel_data=p.tobytes()[: p.size // 2]), "truncated")


@pytest.mark.parametrize(("photometric", "shape", "stored_inverted", "warned"), [
    ("MONOCHROME1", "INVERSE", True, False),   # the DX pairing: one inversion, as with no shape
    ("MONOCHROME2", "IDENTITY", False, False),
    ("MONOCHROME2", "INVERSE", True, True),    # a viewer shows it inverted, so do we, and say so
    ("MONOCHROME1", "IDENTITY", False, True),
])
def test_presentation_lut_shape_decides_inversion(tmp_path, source, photometric, shape, stored_inverted, warned):
    p = _gray(source)
    stored = 255 - p if stored_inverted else p
    img, info = read_dicom(dicom_bytes(tmp_path, stored, photometric=photometric, PresentationLUTShape=shape),
                           "x.dcm")
    np.testing.assert_array_equal(np.asarray(img), p)
    assert bool([w for w in info.warnings if "Presentation LUT Shape" in w]) == warned, info.warnings


def test_unknown_presentation_lut_shape_ignored_with_warning(tmp_path, source):
    p = _gray(source)
    img, info = read_dicom(dicom_bytes(tmp_path, 255 - p, photometric="MONOCHROME1", PresentationLUTShape="LIN OD"),
                           "x.dcm")
    np.testing.assert_array_equal(np.asarray(img), p)
    assert any("Shape LIN OD is not IDENTITY or INVERSE" in w for w in info.warnings), info.warnings


def test_unusable_window_falls_back_with_warning(tmp_path, source):
    p = _gray(source)
    img, info = read_dicom(dicom_bytes(tmp_path, p, WindowCenter=100, WindowWidth=0), "x.dcm")
    np.testing.assert_array_equal(np.asarray(img), p)
    assert any("window unusable" in w for w in info.warnings)


# What a site typed into a text attribute instead of a defined term (a patient, an ID): never echoed.
TYPED = ("MUELLER", "HANS", "PID12345", "mueller")


def _assert_not_echoed(*texts: str) -> None:
    leaked = [t for t in TYPED if any(t in text for text in texts)]
    assert not leaked, f"{leaked} echoed in {texts}"


@pytest.mark.parametrize("attrs, view, warnings", [
    ({"ViewPosition": "MUELLER HANS", "BodyPartExamined": "PID12345 KNEE"}, "unrecognised",
     ["view position is an unrecognised value, not frontal", "body part examined is an unrecognised value"]),
    ({"ViewPosition": "AP MUELLER", "BodyPartExamined": "KNEE"}, "AP", ["body part examined is KNEE, not CHEST"]),
    ({"ViewPosition": "AP SUPINE"}, "AP SUPINE", []),
    ({"ViewPosition": "RLD", "BodyPartExamined": "PID12345"}, "RLD",
     ["view position is RLD, not frontal", "body part examined is an unrecognised value"]),
    ({"ViewPosition": "LL MUELLER HANS"}, "LL", ["lateral view (LL)"]),
    ({"PresentationLUTShape": "MUELLER"}, "", ["Presentation LUT Shape an unrecognised value is not IDENTITY"]),
])
def test_dicom_text_is_echoed_only_when_it_is_a_defined_term(tmp_path, source, caplog, attrs, view, warnings):
    caplog.set_level("DEBUG")
    _, info = read_dicom(dicom_bytes(tmp_path, _gray(source), **attrs), "x.dcm")
    assert info.view_position == view
    assert info.is_frontal == (view in ("", "AP", "AP SUPINE"))
    for expected in warnings:
        assert any(w.startswith(expected) for w in info.warnings), (expected, info.warnings)
    _assert_not_echoed(repr(info), caplog.text)


@pytest.mark.parametrize("attrs, error, match", [
    ({"Modality": "MUELLERHANS"}, OutOfScopeError, "DICOM modality is an unrecognised value; only CR/DX"),
    ({"photometric": "MUELLER"}, ImageError, "photometric interpretation an unrecognised value is not supported"),
])
def test_an_unrecognised_modality_or_photometric_is_refused_without_its_text(tmp_path, source, attrs, error, match):
    with pytest.raises(error, match=match) as caught:
        read_dicom(dicom_bytes(tmp_path, _gray(source), **attrs), "x.dcm")
    _assert_not_echoed(str(caught.value))


def test_malformed_values_are_not_quoted_by_pydicom_or_the_error(tmp_path, source, caplog, recwarn):
    # lower case is invalid in a Code String and text in an Integer String: pydicom's validation would quote
    # both in a warning and int() in its error; what reaches the error, the log and warnings is neither
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(tmp_path, _gray(source))))
    ds.add_new(0x00185101, "CS", "mueller hans")  # ViewPosition
    ds.add_new(0x00280008, "LO", "MUELLER")  # NumberOfFrames, with the wrong VR
    out = io.BytesIO()
    with pydicom.config.disable_value_validation():
        ds.save_as(out)
    caplog.set_level("DEBUG")
    error = _refuse(out.getvalue(), r"attributes are malformed \(ValueError: invalid literal for int\(\) with base 10")
    _assert_not_echoed(str(error), caplog.text, *(str(w.message) for w in recwarn))


def test_no_identifiers_in_logs(tmp_path, source, caplog):
    caplog.set_level("DEBUG")
    read_dicom(dicom_bytes(tmp_path, _gray(source), ViewPosition="LL", Modality="CR"), "x.dcm")
    assert caplog.records
    assert not [v for v in IDENTIFIERS.values() if v in caplog.text], caplog.text


# Compressed transfer syntaxes as PACS export them; the ``dicom`` extra installs pylibjpeg with its
# libjpeg (JPEG Lossless, JPEG-LS) and openjpeg (JPEG 2000) plugins. Files pydicom ships are
# relabelled DX (several are MR or secondary captures, which the modality check would refuse)
# and compared with a losslessly stored copy of the same image, decoded by the same code.


def _pydicom_file(name: str, tmp_path: Path) -> bytes:
    """A test file that ships with pydicom (never downloaded), relabelled as a DX radiograph."""
    path = Path(pydicom.data.get_testdata_file(name, download=False) or "")
    if not path.is_file():
        pytest.skip(f"pydicom's test file {name} is not installed")
    ds = pydicom.dcmread(path)
    ds.Modality = "DX"
    out = tmp_path / name
    ds.save_as(out)
    return out.read_bytes()


def _require_decoder(uid) -> None:
    if not get_decoder(uid).is_available:
        pytest.fail(f"no decoder for {uid.name}: the dicom extra installs pylibjpeg, pylibjpeg-libjpeg and "
                    "pylibjpeg-openjpeg (pip install 'pneumoscan[dicom]')")


@pytest.mark.parametrize("compressed, reference, uid", [
    ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle.dcm", JPEGLosslessSV1),
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm", JPEGLSLossless),
    ("MR_small_jp2klossless.dcm", "MR_small.dcm", JPEG2000Lossless),
])
def test_lossless_compressed_syntaxes_decode(tmp_path, compressed, reference, uid):
    _require_decoder(uid)
    img, info = read_dicom(_pydicom_file(compressed, tmp_path), compressed)
    expected, _ = read_dicom(_pydicom_file(reference, tmp_path), reference)
    assert info.transfer_syntax == uid.name
    assert np.asarray(img).std() > 10, "decoded to a flat image"
    np.testing.assert_array_equal(np.asarray(img), np.asarray(expected))


@pytest.mark.parametrize("name, shape", [("JPEGLSNearLossless_08.dcm", (45, 10)),
                                         ("JPEGLSNearLossless_16.dcm", (50, 10))])
def test_jpeg_ls_near_lossless_decodes(tmp_path, name, shape):
    _require_decoder(JPEGLSNearLossless)
    img, info = read_dicom(_pydicom_file(name, tmp_path), name)
    assert info.transfer_syntax == JPEGLSNearLossless.name
    assert np.asarray(img).shape == shape and np.asarray(img).std() > 10


def test_jpeg2000_lossless_round_trip_of_a_radiograph(tmp_path, source):
    """A real chest X-ray compressed as JPEG 2000 (lossless) decodes to the source pixels."""
    _require_decoder(JPEG2000Lossless)
    from pydicom.pixels import get_encoder

    if not get_encoder(JPEG2000Lossless).is_available:
        pytest.skip("no JPEG 2000 encoder (pylibjpeg-openjpeg) to make the file")
    p = _gray(source)
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(tmp_path, p)))
    ds.compress(JPEG2000Lossless)
    out = tmp_path / "j2k.dcm"
    ds.save_as(out)
    img, info = read_dicom(out.read_bytes(), "j2k.dcm")
    np.testing.assert_array_equal(np.asarray(img), p)
    assert info.transfer_syntax == JPEG2000Lossless.name
    _assert_private(info)
