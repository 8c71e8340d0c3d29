"""Writing real DICOM files for tests (shared by the DICOM reader and the inference tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
IDENTIFIERS = {"PatientName": "Doe^Jane", "PatientID": "PID-93417", "PatientBirthDate": "19610423"}


def dicom_bytes(tmp_path: Path, pixels: np.ndarray, *, filename: str = "image.dcm",
                 photometric: str = "MONOCHROME2", bits_stored: int | None = None,
                 transfer_syntax: str = ExplicitVRLittleEndian, pixel_data: bytes | None = None,
                 drop: tuple[str, ...] = (), **attrs) -> bytes:
    """Write a DICOM file holding ``pixels`` (rows, cols[, 3]) and return its bytes.

    ``pixel_data`` replaces the raw pixel bytes (encapsulated data, extra frames); ``attrs``
    sets or overrides any attribute by keyword; ``drop`` deletes attributes before writing.
    """
    sop_class = attrs.pop("SOPClassUID", DX_FOR_PRESENTATION)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    path = tmp_path / filename
    ds = FileDataset(str(path), Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    for keyword, value in IDENTIFIERS.items():
        setattr(ds, keyword, value)
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes() if pixel_data is None else pixel_data
    if pydicom.uid.UID(transfer_syntax).is_encapsulated:
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    for keyword in drop:
        del ds[keyword]
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()
