"""DICOM chest radiographs (CR, DX) to the 8-bit grayscale image every other input becomes.

The rendering follows the DICOM grayscale pipeline a viewer applies: stored values limited
to *Bits Stored*, then the Modality LUT (rescale slope/intercept), then the VOI LUT or the
first window, then MONOCHROME1 inverted so bone is bright as in MONOCHROME2 (a Presentation LUT
Shape, where present, decides the inversion instead, as it does in a viewer). Without a VOI
LUT or window, 8-bit data is shown as stored (it is usually a capture of an already
windowed image) and deeper data is stretched from its minimum to its maximum.

Only image-describing attributes are read: no patient identifier (name, ID, birth date)
is stored, logged or put into an error message. ``patient_key`` reads (0010,0020) PatientID for one
purpose: labelled folders group a patient's films by a hash of it, kept in memory only. A text attribute
that is read (ViewPosition, BodyPartExamined, Modality, ...) is echoed in warnings, errors, logs and
``DicomInfo`` only when it is one of DICOM's defined terms for it; any other text (a site may type
anything there, a patient's name included) is shown as "an unrecognised value". pydicom's value
validation is turned off for reading, since its warnings quote the offending value.

pydicom is an optional dependency (``pip install 'pneumoscan[dicom]'``), imported when a
DICOM file is first read, so ``is_dicom`` works without it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .errors import ImageError, OutOfScopeError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset
    from pydicom.uid import UID

log = logging.getLogger(__name__)

ACCEPTED_MODALITIES = ("CR", "DX")
# ViewPosition (0018,5101): DICOM's defined terms are AP, PA, LL, RL, RLD, LLD, RLO, LLO; "LATERAL" and "LAT"
# are common non-standard spellings. Only frontal films are what the model reads ("" = not stated: the pixels
# checks decide); any other view is answered with a warning that keeps it from risk LOW, never as a frontal film.
FRONTAL_VIEWS = ("", "PA", "AP")
LATERAL_VIEWS = ("LATERAL", "LAT", "LL", "RL", "LLAT", "RLAT")
VIEW_TERMS = frozenset(FRONTAL_VIEWS[1:] + LATERAL_VIEWS + ("RLD", "LLD", "RLO", "LLO"))
# Words that follow a view in some sites' values ("AP SUPINE", "PA_ERECT"); kept in what is shown.
VIEW_QUALIFIERS = frozenset(("SUPINE", "ERECT", "UPRIGHT", "SEMIERECT", "SEMI", "SITTING", "PRONE", "PORTABLE",
                             "DECUBITUS", "LORDOTIC", "INSPIRATION", "EXPIRATION"))
# An attribute's text that is not a defined term is never echoed: it is shown as this (DicomInfo fields), and
# described in sentences as UNRECOGNISED_TEXT. Code String values are at most 16 characters.
UNRECOGNISED = "unrecognised"
UNRECOGNISED_TEXT = "an unrecognised value"
CS_MAX_CHARS = 16
# (0008,0060) Modality, defined terms of PS3.3 C.7.3.1.1.1 (retired ones included: old files carry them).
MODALITY_TERMS = frozenset((
    "AR", "ASMT", "AU", "BDUS", "BI", "BMD", "CR", "CT", "CTPROTOCOL", "DG", "DOC", "DX", "ECG", "EEG", "EMG",
    "EOG", "EPS", "ES", "FID", "GM", "HC", "HD", "IO", "IOL", "IVOCT", "IVUS", "KER", "KO", "LEN", "LS", "M3D",
    "MG", "MR", "NM", "OAM", "OCT", "OP", "OPM", "OPT", "OPTBSV", "OPTENF", "OPV", "OSS", "OT", "PLAN", "POS",
    "PR", "PT", "PX", "REG", "RESP", "RF", "RG", "RTDOSE", "RTIMAGE", "RTINTENT", "RTPLAN", "RTRAD", "RTRECORD",
    "RTSEGANN", "RTSTRUCT", "RWV", "SEG", "SM", "SMR", "SR", "SRF", "STAIN", "TEXTUREMAP", "TG", "US", "VA",
    "XA", "XAPROTOCOL", "XC",
    "CD", "CF", "CP", "CS", "DD", "DF", "DM", "DS", "EC", "FA", "FS", "LP", "MA", "MS", "OPR", "ST", "VF",
))
# (0018,0015) BodyPartExamined, the terms of PS3.16 Annex L, and THORAX, which many sites send for a chest film.
BODY_PART_TERMS = frozenset((
    "ABDOMEN", "ABDOMENPELVIS", "ADRENAL", "ANKLE", "AORTA", "ARM", "AXILLA", "BACK", "BLADDER", "BRAIN",
    "BREAST", "BRONCHUS", "BUTTOCK", "CALCANEUS", "CALF", "CAROTID", "CEREBELLUM", "CERVIX", "CHEEK", "CHEST",
    "CHESTABDOMEN", "CHESTABDPELVIS", "CIRCLEOFWILLIS", "CLAVICLE", "COCCYX", "COLON", "CORNEA",
    "CORONARYARTERY", "CSPINE", "CTSPINE", "DUODENUM", "EAR", "ELBOW", "ESOPHAGUS", "EXTREMITY", "EYE", "EYELID",
    "FACE", "FEMUR", "FINGER", "FOOT", "GALLBLADDER", "HAND", "HEAD", "HEADNECK", "HEART", "HIP", "HUMERUS",
    "IAC", "ILEUM", "ILIUM", "JAW", "JEJUNUM", "KIDNEY", "KNEE", "LARYNX", "LEG", "LIVER", "LSPINE", "LSSPINE",
    "LUNG", "MAXILLA", "MEDIASTINUM", "MOUTH", "NECK", "NECKCHEST", "NECKCHESTABDOMEN", "NECKCHESTABDPELV",
    "NOSE", "ORBIT", "OVARY", "PANCREAS", "PAROTID", "PATELLA", "PELVIS", "PENIS", "PHARYNX", "PROSTATE",
    "RADIUS", "RADIUSULNA", "RECTUM", "RIB", "SCALP", "SCAPULA", "SCLERA", "SCROTUM", "SHOULDER", "SKULL",
    "SPINE", "SPLEEN", "SSPINE", "STERNUM", "STOMACH", "SUBMANDIBULAR", "TESTIS", "THIGH", "THORAX", "THUMB",
    "THYMUS", "THYROID", "TIBIA", "TIBIAFIBULA", "TLSPINE", "TMJ", "TOE", "TONGUE", "TRACHEA", "TSPINE", "ULNA",
    "URETER", "URETHRA", "UTERUS", "VAGINA", "VULVA", "WHOLEBODY", "WRIST", "ZYGOMA",
))
# (0028,0004) Photometric Interpretation, PS3.3 C.7.6.3.1.2 (retired ones included).
PHOTOMETRIC_TERMS = frozenset(("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422",
                               "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "XYB", "HSV", "ARGB",
                               "CMYK"))
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
REASON_MAX_CHARS = 200

_MODALITY_NAMES = {
    "CT": "computed tomography",
    "MR": "magnetic resonance",
    "US": "ultrasound",
    "NM": "nuclear medicine",
    "PT": "PET",
    "MG": "mammography",
    "XA": "X-ray angiography",
    "RF": "fluoroscopy",
    "IO": "intra-oral radiography",
    "PX": "panoramic dental radiography",
    "ES": "endoscopy",
    "SM": "slide microscopy",
    "SR": "structured report",
    "PR": "presentation state",
    "SEG": "segmentation",
}
_SECONDARY_CAPTURE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image
    "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color Secondary Capture
}
_COLOR_PHOTOMETRICS = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
_GRAY_PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")
_CHEST_BODY_PARTS = ("", "CHEST", "THORAX", "LUNG")
# The dicom extra installs pylibjpeg with both plugins; the bare packages are named for other installs.
_LIBJPEG = "pip install 'pneumoscan[dicom]' (or pip install pylibjpeg pylibjpeg-libjpeg)"
_OPENJPEG = "pip install 'pneumoscan[dicom]' (or pip install pylibjpeg pylibjpeg-openjpeg)"
# Transfer syntax UID -> the pip packages that let pydicom decode it.
_DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.50": _LIBJPEG,  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": _LIBJPEG,  # JPEG Extended
    "1.2.840.10008.1.2.4.57": _LIBJPEG,  # JPEG Lossless
    "1.2.840.10008.1.2.4.70": _LIBJPEG,  # JPEG Lossless, first-order prediction
    "1.2.840.10008.1.2.4.80": _LIBJPEG + " (or pyjpegls)",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": _LIBJPEG + " (or pyjpegls)",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": _OPENJPEG,  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": _OPENJPEG,  # JPEG 2000
    "1.2.840.10008.1.2.4.201": _OPENJPEG,  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": _OPENJPEG,  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": _OPENJPEG,  # HTJ2K
    "1.2.840.10008.1.2.5": "pip install pylibjpeg pylibjpeg-rle",  # RLE Lossless
}
_GDCM = "pip install python-gdcm"


@dataclass
class DicomInfo:
    """What a DICOM file says about its image; no patient identifiers.

    ``view_position`` is (0018,5101) ViewPosition upper-cased (PA, AP, LATERAL, LL, RL, ...; see
    ``shown_view``), ``UNRECOGNISED`` for text that is no defined view, or "" when absent; ``modality`` and
    ``photometric_interpretation`` likewise. ``warnings`` lists reasons to treat a prediction with caution.
    """

    modality: str
    view_position: str
    photometric_interpretation: str
    bits_stored: int
    transfer_syntax: str
    is_lateral: bool
    warnings: list[str] = field(default_factory=list)
    colorfulness: float = 0.0  # of a colour image's pixels (preprocess.colorfulness); 0 for grayscale

    @property
    def is_frontal(self) -> bool:
        """PA, AP (also written with a qualifier, "AP SUPINE", "PA_ERECT") or not stated; laterals, obliques
        (RLO, LLO) and decubitus views (RLD, LLD) are not."""
        return view_word(self.view_position) in FRONTAL_VIEWS


_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"OB", b"OD", b"OF",
        b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI", b"UL", b"UN",
        b"UR", b"US", b"UT", b"UV"}


def view_word(view_position: str) -> str:
    """The first word of a ViewPosition ("AP SUPINE" -> "AP", "PA_ERECT" -> "PA"); "" when absent."""
    words = _view_words(view_position)
    return words[0] if words else ""


def _view_words(view_position: str) -> list[str]:
    return view_position.replace("_", " ").replace("-", " ").split()


def shown_term(value: str, terms: Collection[str]) -> str:
    """``value`` (stripped, upper-cased) where it is one of ``terms``, "" where empty, else ``UNRECOGNISED``:
    what of a DICOM text attribute may be echoed."""
    value = value.strip().upper()
    if not value:
        return ""
    return value if value in terms else UNRECOGNISED


def shown_view(view_position: str) -> str:
    """What of a ViewPosition may be echoed: the whole value when each word is a view or a known qualifier
    ("AP SUPINE") and it fits a Code String; else its first word when that is a view ("AP"); else
    ``UNRECOGNISED`` ("" when absent). Its first word is the raw value's, so frontal or not is decided alike."""
    value = view_position.strip().upper()
    words = _view_words(value)
    if not words:
        return ""
    if words[0] not in VIEW_TERMS:
        return UNRECOGNISED
    if len(value) <= CS_MAX_CHARS and all(w in VIEW_TERMS or w in VIEW_QUALIFIERS for w in words):
        return value
    return words[0]


def described(shown: str) -> str:
    """A shown value for a sentence: ``UNRECOGNISED`` becomes "an unrecognised value"."""
    return UNRECOGNISED_TEXT if shown == UNRECOGNISED else shown


def _pydicom():
    """pydicom, imported on first use, with value validation off for reading: its warnings ("Invalid value for
    VR CS: 'mueller hans'") quote the value, which may be a patient's name, into the log."""
    import pydicom
    from pydicom import config

    config.settings.reading_validation_mode = config.IGNORE
    return pydicom


def is_dicom(data: bytes) -> bool:
    """True when ``data`` is a DICOM file, whatever the file name: Part 10 ("DICM" after the 128-byte preamble),
    or a data set written without the preamble (it starts with a little-endian tag of the file meta group
    0002 or the identifying group 0008, explicit or implicit VR), as some older systems export."""
    return data[128:132] == b"DICM" or _is_bare_dataset(data)


def _is_bare_dataset(data: bytes) -> bool:
    if len(data) < 8 or data[:2] not in (b"\x02\x00", b"\x08\x00"):
        return False
    if data[4:6] in _VRS:  # explicit VR
        return True
    return data[:2] == b"\x08\x00" and int.from_bytes(data[4:8], "little") < 1024  # implicit VR: a short value


def patient_key(path: str | os.PathLike) -> str:
    """A grouping key for the patient of a DICOM file: ``dicom:`` and 16 hex digits of the sha256 of its
    (0010,0020) PatientID, or "" when the file has none or its header cannot be read.

    Used only in memory, to keep one patient's films together (patient-level splits, folds and bootstrap
    CIs); neither the PatientID nor the key is stored or logged. The key is not anonymous (an unsalted
    hash of a short ID can be reversed by trying every ID), so it must never be written out either.
    """
    try:
        ds = _pydicom().dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
        pid = str(ds.get("PatientID", "") or "").strip()
    except Exception:  # pydicom fails with many types on a broken header; decoding reports what is wrong
        return ""
    return f"dicom:{hashlib.sha256(pid.encode()).hexdigest()[:16]}" if pid else ""


def read_dicom(data: bytes, name: str) -> tuple[Image.Image, DicomInfo]:
    """Decode a DICOM chest radiograph into an 8-bit grayscale image at original geometry.

    Args:
        data: the whole file's bytes.
        name: how to name the file in error messages (a path or upload name).

    Returns:
        A mode 'L' PIL image (first frame of a multi-frame file) and the file's ``DicomInfo``.

    Raises:
        ImageError: pydicom missing; not parseable as DICOM; no pixel data; a modality other
            than CR/DX (or a secondary capture); an unsupported photometric interpretation;
            a compressed transfer syntax no installed decoder can decode; corrupt pixel data.
    """
    try:
        # Imported here so the package and ``is_dicom`` work without the optional extra.
        pydicom = _pydicom()
        from pydicom.errors import InvalidDicomError
    except ImportError as exc:
        raise ImageError(
            f"{name}: is a DICOM file, but pydicom is not installed; pip install 'pneumoscan[dicom]'"
        ) from exc

    bare = data[128:132] != b"DICM" and _is_bare_dataset(data)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=bare)
        if bare:
            _describe_bare(ds)
    except InvalidDicomError as exc:
        raise ImageError(f"{name}: not a DICOM file (no 'DICM' marker after the 128-byte preamble)") from exc
    except Exception as exc:  # a malformed file can fail inside pydicom's parser with many exception types
        raise ImageError(f"{name}: cannot parse DICOM file, it may be truncated or corrupt ({_reason(exc)})") from exc
    try:
        img, info = _render(ds, name)
        if bare:
            info.warnings.append("DICOM data set without the 128-byte preamble and 'DICM' marker (not a Part 10 "
                                 "file): read as it is; prefer the file the PACS or modality exports")
        return img, info
    except ImageError:
        raise
    except Exception as exc:  # pydicom parses values lazily, so a malformed attribute fails on first access
        raise ImageError(f"{name}: DICOM image attributes are malformed ({_reason(exc)}); re-export the file") from exc


def _describe_bare(ds: Dataset) -> None:
    """A data set read without its preamble: where it has no Transfer Syntax UID, the one pydicom read it
    with (uncompressed only: a compressed one cannot be told from the bytes)."""
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = getattr(ds, "original_encoding", (None, None))
        if implicit is not None:
            ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                              ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def _reason(exc: Exception) -> str:
    """An exception as one line for an error message, at most ``REASON_MAX_CHARS``, with quoted text left out:
    pydicom and int()/float() quote the attribute value they failed on ("invalid literal for int(): 'MUELLER'")."""
    text = f"{type(exc).__name__}: {_QUOTED.sub('<value>', ' '.join(str(exc).split()))}"
    return text if len(text) <= REASON_MAX_CHARS else text[:REASON_MAX_CHARS - 3] + "..."


def _syntax_name(tsyntax: UID) -> str:
    """A transfer syntax's name where pydicom knows it, else "UID <uid>" (the UID only where it is one: a
    malformed file can hold any text there)."""
    from pydicom.uid import UID_dictionary

    if tsyntax in UID_dictionary:
        return tsyntax.name
    return f"UID {tsyntax}" if len(tsyntax) <= 64 and _UID.fullmatch(tsyntax) else f"UID {UNRECOGNISED_TEXT}"


def _describe_syntax(tsyntax: UID) -> str:
    """A transfer syntax for messages: name and UID where known (``_syntax_name`` otherwise)."""
    name = _syntax_name(tsyntax)
    return name if name.startswith("UID ") else f"{name} ({tsyntax})"


def _render(ds: Dataset, name: str) -> tuple[Image.Image, DicomInfo]:
    """``read_dicom`` after parsing: scope checks, decoding, grayscale rendering."""
    if "PixelData" not in ds:
        raise ImageError(f"{name}: DICOM file has no image (no PixelData element); it may be a report, "
                         "presentation state or DICOMDIR: export the radiograph itself")

    info = DicomInfo(
        modality=shown_term(str(ds.get("Modality", "")), MODALITY_TERMS),
        view_position=shown_view(str(ds.get("ViewPosition", ""))),
        photometric_interpretation=shown_term(str(ds.get("PhotometricInterpretation", "")), PHOTOMETRIC_TERMS),
        bits_stored=int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8),
        transfer_syntax="",
        is_lateral=False,
    )
    info.is_lateral = view_word(info.view_position) in LATERAL_VIEWS
    _check_scope(ds, info, name)

    tsyntax = ds.file_meta.get("TransferSyntaxUID")
    if tsyntax is None:
        raise ImageError(f"{name}: DICOM file meta has no Transfer Syntax UID (0002,0010), so its pixel "
                         "data cannot be interpreted; re-export it from the PACS or modality")
    info.transfer_syntax = _syntax_name(tsyntax)

    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if rows < 2 or cols < 2:
        raise ImageError(f"{name}: image is {cols}x{rows} pixels, too small to be a radiograph")
    from .preprocess import MAX_IMAGE_PIXELS  # here: preprocess imports this module

    if rows * cols > MAX_IMAGE_PIXELS:
        raise ImageError(f"{name}: image is {cols}x{rows} pixels, more than the {MAX_IMAGE_PIXELS} "
                         "allowed; downsample it before upload")

    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        info.warnings.append(f"multi-frame DICOM ({frames} frames): only the first frame was used")

    arr = _decode_first_frame(ds, tsyntax, name)
    if info.photometric_interpretation in _COLOR_PHOTOMETRICS:
        gray = _color_to_uint8(arr, info.bits_stored)
        from .preprocess import colorfulness

        # on 8-bit levels and about 256 px, as for a PNG: the gate refuses a colourful image whatever its container
        step = max(1, max(rows, cols) // 256)
        levels = arr[::step, ::step, :3].astype(np.float64) * (255.0 / (2**info.bits_stored - 1))
        info.colorfulness = colorfulness(levels)
    else:
        gray = _gray_to_uint8(arr, ds, info)
    log.debug("%s: DICOM %s %s %s %d-bit %s, %dx%d", name, info.modality, info.view_position or "-",
              info.photometric_interpretation, info.bits_stored, info.transfer_syntax, cols, rows)
    return Image.fromarray(np.ascontiguousarray(gray)), info


def _check_scope(ds: Dataset, info: DicomInfo, name: str) -> None:
    """Refuse what is not a radiograph; note in ``info.warnings`` what may be one but is unusual."""
    is_secondary_capture = str(ds.get("SOPClassUID", "")) in _SECONDARY_CAPTURE_SOP_CLASSES
    modality = info.modality
    if modality in ACCEPTED_MODALITIES:
        if is_secondary_capture:
            info.warnings.append(f"secondary capture labelled {modality}: pixels may be a screenshot or "
                                 "digitised film rather than the original radiograph")
    elif modality in ("", "OT"):
        what = "secondary capture" if is_secondary_capture else f"modality {modality or 'missing'}"
        info.warnings.append(f"{what}: not marked as a CR/DX radiograph; check that it is a chest X-ray")
    else:
        what = f"{modality} ({_MODALITY_NAMES[modality]})" if modality in _MODALITY_NAMES else described(modality)
        raise OutOfScopeError(f"{name}: out of scope: DICOM modality is {what}; only CR/DX chest "
                              "radiographs are supported: upload a chest X-ray (modality CR or DX)")

    if info.photometric_interpretation not in _GRAY_PHOTOMETRICS + _COLOR_PHOTOMETRICS:
        raise ImageError(f"{name}: DICOM photometric interpretation {described(info.photometric_interpretation)} "
                         f"is not supported; expected one of {', '.join(_GRAY_PHOTOMETRICS + _COLOR_PHOTOMETRICS)}")
    if info.photometric_interpretation in _COLOR_PHOTOMETRICS:
        info.warnings.append(f"colour image ({info.photometric_interpretation}) converted to grayscale: "
                             "radiographs are grayscale, so this may be a photo or screenshot")
    if info.is_lateral:
        info.warnings.append(f"lateral view ({info.view_position}): the model was trained on frontal (PA/AP) "
                             "radiographs")
    elif not info.is_frontal:
        info.warnings.append(f"view position is {described(info.view_position)}, not frontal (PA/AP): the model "
                             "was trained on frontal radiographs")
    body_part = shown_term(str(ds.get("BodyPartExamined", "")), BODY_PART_TERMS)
    if body_part not in _CHEST_BODY_PARTS:
        info.warnings.append(f"body part examined is {described(body_part)}, not CHEST")
    if str(ds.get("PresentationIntentType", "")).strip().upper() == "FOR PROCESSING":
        info.warnings.append("'FOR PROCESSING' image: raw detector data, which looks unlike the processed "
                             "radiographs the model was trained on; export the 'FOR PRESENTATION' image")


def _decode_first_frame(ds: Dataset, tsyntax: UID, name: str) -> np.ndarray:
    """The first frame's stored values: (rows, cols) or (rows, cols, 3); YBR_FULL* becomes RGB."""
    from pydicom.pixels import get_decoder, pixel_array

    what = _describe_syntax(tsyntax)
    packages = _DECODER_PACKAGES.get(str(tsyntax), _GDCM)
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as exc:
        raise ImageError(f"{name}: pixel data uses transfer syntax {what}, which pydicom cannot decode; "
                         "convert the file to an uncompressed transfer syntax (e.g. dcmdjpeg, gdcmconv --raw)"
                         ) from exc
    if not decoder.is_available:
        raise ImageError(f"{name}: pixel data is compressed as {what} and no decoder for it is installed; "
                         f"{packages}")
    try:
        # index=0 decodes only the first frame; values are limited to Bits Stored below.
        arr = pixel_array(ds, index=0)
    except Exception as exc:  # decoder plugins raise many exception types on corrupt or unusual streams
        reason = _reason(exc)
        if not tsyntax.is_encapsulated:
            raise ImageError(f"{name}: pixel data ({what}) is truncated or does not match the image size and "
                             f"depth the file declares ({reason}); re-export the file") from exc
        raise ImageError(f"{name}: cannot decode pixel data compressed as {what} ({reason}); the data may be "
                         f"corrupt, or the installed decoder may not support this variant: {packages}") from exc
    photometric = str(ds.PhotometricInterpretation).strip().upper()  # one of the supported: checked before
    color = photometric in _COLOR_PHOTOMETRICS
    if arr.ndim != (3 if color else 2) or (color and arr.shape[2] != 3):
        expected = "(rows, columns, 3)" if color else "(rows, columns)"
        raise ImageError(f"{name}: decoded pixel data has shape {arr.shape}, expected {expected} for "
                         f"{photometric}; the file's image attributes are inconsistent")
    if np.issubdtype(arr.dtype, np.integer):
        arr = _limit_to_bits_stored(arr, int(ds.get("BitsStored") or arr.dtype.itemsize * 8),
                                    signed=int(ds.get("PixelRepresentation", 0)) == 1)
    return arr


def _limit_to_bits_stored(arr: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    """Clear the bits above *Bits Stored* (overlays, garbage); sign-extend signed data from its top stored bit."""
    container = arr.dtype.itemsize * 8
    if bits_stored >= container:
        return arr
    if signed:
        shift = container - bits_stored
        return np.right_shift(np.left_shift(arr, shift), shift)
    return arr & np.asarray((1 << bits_stored) - 1, dtype=arr.dtype)


def _gray_to_uint8(arr: np.ndarray, ds: Dataset, info: DicomInfo) -> np.ndarray:
    """Modality LUT, VOI LUT or first window (else 8-bit as is / min-max), MONOCHROME1 / INVERSE inverted."""
    from pydicom.pixels import apply_modality_lut, apply_windowing

    values = apply_modality_lut(arr, ds)
    frac = None
    voi_item = (ds.get("VOILUTSequence") or [None])[0]
    has_window = ds.get("WindowCenter") not in (None, "") and ds.get("WindowWidth") not in (None, "")
    try:
        if voi_item is not None and "LUTDescriptor" in voi_item and "LUTData" in voi_item:
            frac = _voi_lut_fraction(values, voi_item, little_endian=ds.original_encoding[1] is not False)
        elif has_window:
            lo, hi = _window_output_range(ds)
            frac = (apply_windowing(values, ds, index=0) - lo) / (hi - lo)
    except (ValueError, NotImplementedError, TypeError, IndexError) as exc:
        info.warnings.append(f"VOI LUT/window unusable ({_reason(exc)}); image shown without it")
        frac = None
    if frac is None:
        frac = _full_range_fraction(values, ds)
    gray = np.clip(frac * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return 255 - gray if _min_is_white(ds, info) else gray


def _min_is_white(ds: Dataset, info: DicomInfo) -> bool:
    """Whether the lowest value is shown white: Presentation LUT Shape if present, else the photometric.

    PS3.3 C.11.6: INVERSE inverts the VOI output into P-values, IDENTITY does not, and the DX image module
    pairs INVERSE with MONOCHROME1 and IDENTITY with MONOCHROME2. A viewer follows the shape, so this
    does too, with a warning where the two disagree (known in mislabelled files; an inverted result is
    then refused by the out-of-scope checks rather than answered).
    """
    mono1 = info.photometric_interpretation == "MONOCHROME1"
    shape = shown_term(str(ds.get("PresentationLUTShape", "") or ""), ("INVERSE", "IDENTITY", "LIN OD"))
    if shape not in ("INVERSE", "IDENTITY"):
        if shape:
            info.warnings.append(f"Presentation LUT Shape {described(shape)} is not IDENTITY or INVERSE; ignored")
        return mono1
    inverse = shape == "INVERSE"
    if inverse != mono1:
        info.warnings.append(
            f"Presentation LUT Shape {shape} contradicts {info.photometric_interpretation} (PS3.3 pairs "
            f"INVERSE with MONOCHROME1); shown as the shape says, with the lowest value "
            f"{'white' if inverse else 'black'}, as a DICOM viewer shows it")
    return inverse


def _voi_lut_fraction(values: np.ndarray, item: Dataset, little_endian: bool) -> np.ndarray:
    """A VOI LUT Sequence item applied to ``values``, as a fraction of the LUT's output range.

    Looked up here rather than with pydicom 3.0's ``apply_voi``, which computes indices in the
    LUT's own dtype and so wraps them for an 8-bit LUT with more than 256 entries.
    """
    entries, first_mapped, bits = (int(v) for v in item.LUTDescriptor)
    if not 8 <= bits <= 16:
        raise ValueError(f"{bits} bits per VOI LUT entry; PS3.3 C.11.2.1.1 allows 8 to 16")
    if item["LUTData"].VR == "OW":
        lut = np.frombuffer(item.LUTData, dtype="<u2" if little_endian else ">u2")
    else:
        lut = np.atleast_1d(np.asarray(item.LUTData))
    lut = lut[: entries or 2**16].astype(np.float64)  # 0 entries means 65536
    index = np.clip(np.rint(values) - first_mapped, 0, len(lut) - 1).astype(np.intp)
    return lut[index] / (2**bits - 1)


def _window_output_range(ds: Dataset) -> tuple[float, float]:
    """The (min, max) that ``apply_windowing`` maps a window onto (PS3.3 C.11.2.1.2; as pydicom computes it)."""
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0)) == 0:
        lo, hi = 0.0, float(2**bits - 1)
    else:
        lo, hi = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        lo, hi = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
    if lo == hi:
        raise ValueError("Rescale Slope is 0")
    return lo, hi


def _full_range_fraction(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """No usable VOI: 8-bit stored values as they are, anything deeper stretched from its min to its max."""
    has_modality_transform = ds.get("ModalityLUTSequence") or (
        float(ds.get("RescaleSlope", 1) or 1) != 1 or float(ds.get("RescaleIntercept", 0) or 0) != 0)
    if int(ds.BitsStored) == 8 and int(ds.get("PixelRepresentation", 0)) == 0 and not has_modality_transform:
        return values.astype(np.float64) / 255.0
    values = values.astype(np.float64)
    lo, hi = float(values.min()), float(values.max())
    return (values - lo) / (hi - lo if hi > lo else 1.0)


def _color_to_uint8(arr: np.ndarray, bits_stored: int) -> np.ndarray:
    """RGB (pydicom has already turned YBR_FULL* into RGB) to 8-bit luma, ITU-R 601 weights as PIL uses."""
    luma = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return np.clip(luma / (2**bits_stored - 1) * 255.0 + 0.5, 0, 255).astype(np.uint8)
