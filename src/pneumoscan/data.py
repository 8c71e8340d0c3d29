"""Finding, checking, splitting and caching labelled chest X-ray folders.

Layout: ``DIR/{train,val,test}/{NORMAL,PNEUMONIA}`` (also found one or two folders
down, as in the Kaggle zip's ``chest_xray/chest_xray``). Every file is read once,
hashed, decoded and resized once; the decoded set is cached on disk keyed by the
files' content, so later epochs and later runs never decode a JPEG again.
"""

from __future__ import annotations

import collections
import csv
import hashlib
import io
import logging
import os
import posixpath
import random
import re
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_path
from .dicom import patient_key
from .errors import CheckpointError, DataError, ImageError
from .predict import CLASS_NAMES
from .preprocess import (
    PREPROCESS_VERSION,
    FolderVisits,
    decode_image,
    is_image_file,
    is_input_file,
    resize_gray,
    special_file_reason,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SKIP_DIRS = {"__macosx"}

_PERSON = re.compile(r"^person(\d+)_", re.IGNORECASE)
_NORMAL_IM = re.compile(r"^(?:NORMAL2-)?IM-(\d+)-", re.IGNORECASE)


@dataclass
class Record:
    """One labelled file."""

    path: Path
    label: int
    patient: str
    sha1: str = ""


@dataclass
class ImageSet:
    """Decoded images of one split, in memory: uint8 (N, S, S) and int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor
    paths: list[str]
    patients: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def class_counts(self) -> dict[str, int]:
        return {name: int((self.labels == i).sum()) for i, name in enumerate(CLASS_NAMES)}


@dataclass
class DataSplits:
    """What training uses: the three splits, the files that could not be used, and how it was split."""

    train: ImageSet
    val: ImageSet
    test: ImageSet | None
    bad_files: list[tuple[str, str]] = field(default_factory=list)
    info: dict = field(default_factory=dict)


def patient_id(filename: str) -> str:
    """The patient a Kermany-style file name belongs to.

    ``personN_bacteria_M`` and ``personN_virus_M`` both map to ``personN`` (the data set
    does not say whether they are the same child, so we group them to be safe);
    ``IM-NNNN-MMMM`` and ``NORMAL2-IM-NNNN-MMMM`` map to ``IM-NNNN`` for the same reason.
    Unknown names are their own patient (the file stem).
    """
    m = _PERSON.match(filename)
    if m:
        return f"person{int(m.group(1))}"
    m = _NORMAL_IM.match(filename)
    if m:
        return f"IM-{int(m.group(1)):04d}"
    return Path(filename).stem


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and p.name.lower() not in _SKIP_DIRS)


def _child_named(folder: Path, name: str) -> Path | None:
    for p in _visible_dirs(folder):
        if p.name.lower() == name.lower():
            return p
    return None


def existing_folder(data_dir: str | os.PathLike, flag: str = "data_dir") -> Path:
    """``data_dir`` as a Path, checked to be a folder.

    Raises:
        DataError: it does not exist, is not a folder, or cannot be looked up (a name too long, no permission).
    """
    base = Path(data_dir).expanduser()
    try:
        found = base.is_dir()
    except OSError as exc:
        raise DataError(f"{flag} {str(base)!r} cannot be read: {exc.strerror or exc}") from exc
    if not found:
        raise DataError(f"{flag} {str(base)!r} does not exist or is not a folder")
    return base


def find_dataset_root(data_dir: str | os.PathLike) -> Path:
    """The folder holding ``train/`` (searched up to two levels below ``data_dir``).

    Raises:
        DataError: ``data_dir`` is missing or no ``train/`` folder is found; says what is there.
    """
    base = existing_folder(data_dir)
    frontier = [base]
    for _ in range(3):
        for folder in frontier:
            if _child_named(folder, "train") is not None:
                return folder
        frontier = [d for f in frontier for d in _visible_dirs(f)]
    found = ", ".join(p.name for p in _visible_dirs(base)) or "no sub-folders"
    raise DataError(
        f"no train/ folder found in {str(base)!r} or two levels below it (found: {found}). "
        f"Expected DIR/train/NORMAL and DIR/train/PNEUMONIA (plus optional val/ and test/)."
    )


def list_images(folder: Path) -> tuple[list[Path], int]:
    """Image and DICOM files under ``folder`` (recursive, sorted) and how many other files were ignored.
    Links to folders are followed, each real folder once (a loop, or a second link to it, is not)."""
    images, ignored = [], 0
    visits = FolderVisits(folder)
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d.lower() not in _SKIP_DIRS
                             and visits.first(os.path.join(dirpath, d)))
        for name in filenames:
            path = Path(dirpath) / name
            if is_input_file(path):
                images.append(path)
            elif not name.startswith("."):
                ignored += 1
    return sorted(images), ignored


def file_patient(path: Path) -> str:
    """The patient a labelled file belongs to: a DICOM file's PatientID (as a pseudonymous hash,
    ``dicom.patient_key``), else the Kermany file-name rule (``patient_id``)."""
    if not is_image_file(path) and path.is_file():  # a regular .dcm, .dicom or extension-less DICOM file
        key = patient_key(path)
        if key:
            return key
    return patient_id(path.name)


def _warn_on_unused_entries(folder: Path) -> None:
    """Say which folders and films beside NORMAL/ and PNEUMONIA/ are left out: they carry no label."""
    try:
        others = [p.name + "/" for p in _visible_dirs(folder) if p.name.upper() not in CLASS_NAMES]
        loose = [p.name for p in sorted(folder.iterdir()) if p.is_file() and is_input_file(p)]
    except OSError:
        return  # an unreadable folder is reported where its films are read
    if others or loose:
        log.warning("%s: %s left out: only the films in %s are used (each class in its own folder)", folder,
                    ", ".join(others + loose[:5]) + (f" and {len(loose) - 5} more file(s)" if len(loose) > 5 else ""),
                    " and ".join(c + "/" for c in CLASS_NAMES))


def discover_labelled(folder: Path, dicom_ids: bool = True, one_class: bool = False) -> list[Record]:
    """Records of ``folder/NORMAL`` and ``folder/PNEUMONIA``; patients by ``file_patient`` (without
    ``dicom_ids``, by file name only: a patients CSV will replace them). With ``one_class`` (a val/ folder, which
    is then pooled into train/) a class folder may be missing or empty.

    Raises:
        DataError: a class folder is missing or holds no images; names what was found.
    """
    records: list[Record] = []
    _warn_on_unused_entries(folder)
    for label, cls in enumerate(CLASS_NAMES):
        cls_dir = _child_named(folder, cls)
        if cls_dir is None and one_class:
            continue
        if cls_dir is None:
            found = ", ".join(p.name for p in _visible_dirs(folder)) or "nothing"
            raise DataError(f"{folder}: missing class folder {cls}/ (found: {found}); "
                            f"expected {' and '.join(c + '/' for c in CLASS_NAMES)}")
        files, ignored = list_images(cls_dir)
        if ignored:
            log.warning("%s: ignored %d file(s) that are neither JPEG/PNG nor DICOM", cls_dir, ignored)
        if not files and not one_class:
            hint = (f": a test split needs films of both classes (sensitivity and specificity); add them, or move "
                    f"{folder.name}/ out of the data set to train without a test evaluation"
                    if folder.name.lower() == "test" else "")
            raise DataError(f"{cls_dir}: no .jpg, .jpeg, .png or DICOM files found{hint}")
        records += [Record(p, label, file_patient(p) if dicom_ids else patient_id(p.name)) for p in files]
    return records


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (what pins a patients CSV to the split it made).

    Raises:
        DataError: the file cannot be read.
    """
    try:
        return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()
    except OSError as exc:
        raise DataError(f"--patients {path}: cannot read it ({exc.strerror or exc})") from exc


_CSV_COLUMNS = ("file", "patient")
_HEADER_WORDS = {"file", "patient", "path", "filename", "id", "patient_id", "patientid", "name", "label", "class",
                 "split", "age", "sex", "view"}


def read_patients_csv(csv_path: str | os.PathLike) -> list[tuple[str, str]]:
    """The (file, patient) rows of a CSV with a header naming the columns ``file`` and ``patient``.

    No cell is ever echoed in an error: a data row mistaken for the header may hold an identifier.

    Raises:
        DataError: the file cannot be read, lacks a column, or has a row with an empty value.
    """
    path = Path(csv_path).expanduser()
    try:
        text = path.read_text(encoding="utf-8-sig")  # a spreadsheet's byte-order mark is not part of a name
    except UnicodeDecodeError as exc:
        raise DataError(f"--patients {csv_path}: not UTF-8 text; save it as 'CSV UTF-8' (in a spreadsheet: "
                        f"Save As, CSV UTF-8)") from exc
    except OSError as exc:
        raise DataError(f"--patients {csv_path}: cannot read it ({exc.strerror or exc})") from exc
    try:
        lines = list(csv.reader(io.StringIO(text)))
    except csv.Error as exc:
        raise DataError(f"--patients {csv_path}: not a readable CSV file ({exc})") from exc
    header = [h.strip().lower() for h in (lines[0] if lines else [])]
    if not all(c in header for c in _CSV_COLUMNS):
        if header and set(header) <= _HEADER_WORDS:  # column names only: safe to show
            found = f"found the columns {', '.join(header)}"
        else:  # maybe a data row: never shown, it may hold a patient identifier
            found = f"its first line has {len(header)} cell(s) and no columns named file and patient; not shown"
            if ";" in text.split("\n", 1)[0]:
                found += "; it holds ';': separate the columns with commas"
        raise DataError(f"--patients {csv_path}: the first line must be the header file,patient ({found}); "
                        f"then one row per film: its path below the data folder (or a file name found once), "
                        f"then its patient's identifier")
    fi, pi = header.index("file"), header.index("patient")
    rows = []
    for line, row in enumerate(lines[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        cells = [row[i].strip() if i < len(row) else "" for i in (fi, pi)]
        if not all(cells):
            raise DataError(f"--patients {csv_path}, line {line}: empty {'file' if not cells[0] else 'patient'}")
        rows.append((cells[0], cells[1]))
    if not rows:
        raise DataError(f"--patients {csv_path}: no rows after the header")
    return rows


_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:/")


def _row_matches(row: str, rel: str, folder_parts: tuple[str, ...], path: Path) -> bool:
    """Whether a CSV row's (normalised) file names the file at ``rel`` below the folder (``folder_parts``:
    the folder's absolute path). A bare name is matched by the caller; a longer row must continue with the
    folder's own last parts (``test/NORMAL/a.jpg`` for a folder ``.../test``), an absolute one be the file."""
    if row == rel:
        return True
    if row.startswith("/"):
        return Path(row).resolve() == path.resolve()
    parts, rel_parts = row.split("/"), rel.split("/")
    if len(parts) <= len(rel_parts) or parts[-len(rel_parts):] != rel_parts:
        return False
    prefix = parts[:-len(rel_parts)]
    if _WINDOWS_DRIVE.match(row):
        prefix = prefix[1:]  # a Windows path: its drive cannot be compared here, its folders can
    return tuple(prefix) == folder_parts[len(folder_parts) - len(prefix):]


def assign_patients(records: list[Record], rows: list[tuple[str, str]], folder: Path) -> None:
    """Set every record's patient from ``rows`` (``read_patients_csv``), matched by path.

    A row names a file by its path below ``folder`` (``NORMAL/a.dcm``; under a data set root
    ``train/NORMAL/a.dcm``), by a longer path that ends in the folder itself (``test/NORMAL/a.dcm`` for
    ``DIR/test``), by its absolute path, or by its bare name when no other file has it. Paths are
    case-sensitive. The patient identifiers are used only to group films; they are never logged.

    Raises:
        DataError: a row matches several files, two rows give one file different patients, or a
            film has no row (a film left to the file-name rule would make the CIs optimistic).
    """
    folder_parts = folder.resolve().parts[1:]
    by_name: dict[str, list[tuple[str, Record]]] = {}
    for r in records:
        by_name.setdefault(r.path.name, []).append((r.path.relative_to(folder).as_posix(), r))
    given: dict[int, str] = {}
    unmatched: list[str] = []
    for file, patient in rows:
        f = posixpath.normpath(file.replace("\\", "/"))
        named = by_name.get(f.rsplit("/", 1)[-1], [])
        hits = [r for rel, r in named if _row_matches(f, rel, folder_parts, r.path)] if "/" in f else [
            r for _, r in named]
        if not hits:
            unmatched.append(file)
            continue
        if len(hits) > 1:
            raise DataError(f"--patients: {file!r} matches {len(hits)} files ("
                            + ", ".join(h.path.relative_to(folder).as_posix() for h in hits[:3])
                            + f"); give the path below {folder}, e.g. {hits[0].path.relative_to(folder).as_posix()}")
        key = id(hits[0])
        if given.setdefault(key, patient) != patient:
            raise DataError(f"--patients: {hits[0].path.relative_to(folder).as_posix()} is given two different "
                            f"patients (rows naming it: one film has one patient)")
    missing = [r for r in records if id(r) not in given]
    if missing:
        hint = (f"; {len(unmatched)} row(s) name no film here, e.g. {', '.join(repr(u) for u in unmatched[:3])} "
                f"(paths are below {folder} and case-sensitive)" if unmatched else "")
        raise DataError(f"--patients: {len(missing)} of {len(records)} films have no row, e.g. "
                        + ", ".join(r.path.relative_to(folder).as_posix() for r in missing[:5])
                        + hint + "; add a row for every film (patient-level CIs and folds need every film's patient)")
    if unmatched:
        log.warning("--patients: %d row(s) name no film under %s (ignored), e.g. %s", len(unmatched), folder,
                    ", ".join(repr(u) for u in unmatched[:3]))
    for r in records:
        r.patient = "csv:" + given[id(r)]
    log.info("patients from the CSV: %d films of %d patients", len(records), len(set(given.values())))


def discover_splits(root: Path, dicom_ids: bool = True) -> dict[str, list[Record] | None]:
    """Records of each split under ``root``; None for a split folder that does not exist (or, but for train/,
    holds no films at all)."""
    out: dict[str, list[Record] | None] = {}
    for split in SPLITS:
        folder = _child_named(root, split)
        if folder is not None and split != "train" and not list_images(folder)[0]:
            # what is left after moving the official 16 val/ films into train/: not a broken data set
            log.warning("%s holds no films: treated as absent (%s)", folder,
                        "the validation patients are drawn from train/" if split == "val" else "no test evaluation")
            folder = None
        out[split] = discover_labelled(folder, dicom_ids, one_class=split == "val") if folder is not None else None
    return out


def set_patients(records: list[Record], patients_csv: str, folder: Path) -> None:
    """The patients CSV's patients for ``records`` (below ``folder``) when one is given; then the warnings of
    ``check_patients``. Without a CSV the records keep the patients discovery gave them."""
    if patients_csv:
        assign_patients(records, read_patients_csv(patients_csv), folder)
    check_patients(records)


def check_patients(records: list[Record]) -> None:
    """Warn where the patients look wrong: DICOM files without a PatientID (each its own patient), or one
    patient holding most films (an anonymiser's constant ID?), either of which makes CIs optimistic."""
    no_id = [r for r in records if not is_image_file(r.path) and not r.patient.startswith(("dicom:", "csv:"))]
    if no_id:
        shared = sum(n for n in collections.Counter(r.patient for r in no_id).values() if n > 1)
        log.warning("%d DICOM file(s) have no PatientID: each is given a patient by its file name%s; where that is "
                    "not the patient, give --patients CSV", len(no_id),
                    f" ({shared} of them share a name with another, e.g. 1.dcm in both classes, and so count as one "
                    f"patient)" if shared else "")
    if len(records) >= 20:
        top = collections.Counter(r.patient for r in records).most_common(1)[0][1]
        if top > len(records) / 2:
            log.warning("%d of %d films belong to one patient (by DICOM PatientID, the CSV or the file name). If "
                        "the IDs were replaced by one value when the films were anonymised, give --patients CSV: "
                        "CIs resample patients and are far too narrow with few", top, len(records))


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pneumoscan"


def _hash_file(path: Path) -> tuple[str, str]:
    """(sha1 of the bytes, '') or ('', why the file cannot be read)."""
    special = special_file_reason(path)
    if special:
        return "", special
    try:
        return hashlib.sha1(path.read_bytes()).hexdigest(), ""
    except OSError as exc:
        return "", f"cannot read file ({exc.strerror or exc})"


NOT_FRONTAL = "view (DICOM ViewPosition"  # in the reason of a DICOM film left out for its view


def left_out_kind(reason: str) -> str:
    """Why a labelled film was left out, in a word: ``not frontal`` (a DICOM lateral or oblique view), ``duplicate``
    (a byte-identical copy), ``out of scope`` (a DICOM modality other than CR/DX) or ``unreadable``."""
    if NOT_FRONTAL in reason:
        return "not frontal"
    if reason.startswith(COPY_REASON):
        return "duplicate"
    return "out of scope" if reason.startswith("out of scope") else "unreadable"


def _decode_file(path: Path, size: int) -> tuple[np.ndarray | None, str]:
    try:
        decoded = decode_image(path, size)
    except ImageError as exc:
        return None, str(exc).removeprefix(f"{path}: ")
    if decoded.dicom is not None and not decoded.dicom.is_frontal:
        what = "lateral" if decoded.dicom.is_lateral else "non-frontal"
        return None, (f"{what} {NOT_FRONTAL} {decoded.dicom.view_position}): the model reads frontal "
                      f"films only, so such views are left out of training, evaluation and calibration")
    return resize_gray(decoded.gray, size), ""


def decode_records(records: list[Record], size: int, cache_dir: Path | None = None,
                   workers: int | None = None) -> tuple[dict[str, np.ndarray], list[tuple[str, str]]]:
    """Hash and decode every record once; fill ``record.sha1``.

    Returns the decoded images by content hash and the (path, reason) of every file that
    could not be used. The decoded set is cached in ``cache_dir`` under a key made of the
    files' content hashes, the size and the preprocessing version.
    """
    workers = workers or min(8, 2 * (os.cpu_count() or 1))
    bad: list[tuple[str, str]] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for rec, (digest, err) in zip(records, pool.map(lambda r: _hash_file(r.path), records)):
            rec.sha1 = digest
            if err:
                bad.append((str(rec.path), err))
    hashes = sorted({r.sha1 for r in records if r.sha1})
    key = hashlib.sha1(f"{PREPROCESS_VERSION}|{size}|{','.join(hashes)}".encode()).hexdigest()[:20]
    cache_file = Path(cache_dir) / f"images-{size}px-{key}.npz" if cache_dir is not None else None
    cache: dict[str, np.ndarray] = {}
    if cache_file is not None and cache_file.exists():
        try:
            with np.load(cache_file) as z:
                hashes, images = z["hashes"], z["images"]
                if images.dtype != np.uint8 or images.shape[1:] != (size, size) or len(images) != len(hashes):
                    raise ValueError(f"it holds {images.dtype} images of shape {images.shape[1:]}, "
                                     f"expected uint8 {size}x{size}")
                cache = dict(zip(hashes.tolist(), images))
            log.info("loaded %d decoded images from cache %s", len(cache), cache_file)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:  # cut short, damaged, foreign
            log.warning("ignoring unreadable image cache %s (%s); decoding the films again", cache_file, exc)
            cache = {}
    todo = {}
    for r in records:
        if r.sha1 and r.sha1 not in cache and r.sha1 not in todo:
            todo[r.sha1] = r
    if todo:
        log.info("decoding %d image(s) at %d px", len(todo), size)
    failed: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for digest, (arr, err) in zip(todo, pool.map(lambda r: _decode_file(r.path, size), todo.values())):
            if err:
                failed[digest] = err
            else:
                cache[digest] = arr
    bad += [(str(r.path), failed[r.sha1]) for r in records if r.sha1 in failed]
    if len(todo) > len(failed) and cache_file is not None:
        _write_cache(cache_file, cache)
    return cache, bad


def _write_cache(cache_file: Path, cache: dict[str, np.ndarray]) -> None:
    try:
        hashes = sorted(cache)
        with atomic_path(cache_file) as tmp:
            np.savez(tmp, hashes=np.array(hashes), images=np.stack([cache[h] for h in hashes]))
        log.info("cached %d decoded images in %s", len(hashes), cache_file)
    except OSError as exc:
        log.warning("could not write image cache %s (%s); continuing without it", cache_file, exc)


COPY_REASON = "byte-identical"  # how the reason of a film left out as a copy starts (``left_out_kind``)


def dedupe(records: list[Record]) -> tuple[list[Record], int]:
    """Drop byte-identical copies (keep the first); copies with conflicting labels are all dropped."""
    kept, dropped = dedupe_records(records)
    return kept, len(dropped)


def dedupe_records(records: list[Record]) -> tuple[list[Record], list[tuple[str, str]]]:
    """``dedupe``, with each dropped file and why: a copy of the file kept, or one of copies filed under both
    classes (each of those is named, with the others)."""
    groups: dict[str, list[Record]] = {}
    for r in records:
        groups.setdefault(r.sha1, []).append(r)
    kept, dropped = [], []
    for r in records:
        group = groups[r.sha1]
        if len({g.label for g in group}) > 1:
            others = ", ".join(str(g.path) for g in group if g is not r)
            dropped.append((str(r.path), f"{COPY_REASON} to {others}, filed under the other class: no label"))
        elif r is group[0]:
            kept.append(r)
        else:
            dropped.append((str(r.path), f"{COPY_REASON} copy of {group[0].path}: counted once"))
    for path, why in dropped:
        if "no label" in why:
            log.warning("dropping %s: %s", path, why)
    return kept, dropped


def patient_groups(records: list[Record]) -> list[list[int]]:
    """Indices grouped so that one patient, and byte-identical files, share a group."""
    parent = list(range(len(records)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for i, r in enumerate(records):
        for key in (f"p:{r.patient}", f"h:{r.sha1}" if r.sha1 else None):
            if key is None:
                continue
            if key in first:
                parent[find(i)] = find(first[key])
            else:
                first[key] = i
    groups: dict[int, list[int]] = {}
    for i in range(len(records)):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values(), key=lambda g: str(records[g[0]].path))


def patient_split(records: list[Record], val_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Split into (train, val) by patient, stratified by class; no group is on both sides."""
    groups = patient_groups(records)
    rng = random.Random(seed)
    val_idx: set[int] = set()
    for label in range(len(CLASS_NAMES)):
        own = [g for g in groups if np.bincount([records[i].label for i in g],
                                                minlength=len(CLASS_NAMES)).argmax() == label]
        target = val_fraction * sum(len(g) for g in own)
        rng.shuffle(own)
        taken = 0
        for g in own:
            if taken >= target:
                break
            val_idx.update(g)
            taken += len(g)
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [r for i, r in enumerate(records) if i in val_idx]
    return train, val


def patient_folds(records: list[Record], k: int, seed: int) -> list[int]:
    """Fold number (0..k-1) of every record for patient-level k-fold cross-validation.

    Groups (a patient, and byte-identical files) never straddle folds; within each class the
    groups are shuffled and dealt to the fold that holds the fewest images of that class so far,
    so every fold gets about 1/k of each class.

    Raises:
        ValueError: k < 2.
        DataError: fewer than k patient groups, or fewer than k of one class: a fold would validate on one
            class (no sensitivity, specificity or AUROC), found only when that fold came to train.
    """
    if k < 2:
        raise ValueError(f"k-fold cross-validation needs k >= 2, got {k}")
    groups = patient_groups(records)
    if len(groups) < k:
        raise DataError(f"{len(groups)} patient group(s) cannot fill {k} folds; lower --cv_folds")
    by_class = [[g for g in groups if np.bincount([records[i].label for i in g],
                                                  minlength=len(CLASS_NAMES)).argmax() == label]
                for label in range(len(CLASS_NAMES))]
    short = [f"{len(own)} {CLASS_NAMES[label]}" for label, own in enumerate(by_class) if len(own) < k]
    if short:
        fewest = min(len(own) for own in by_class)
        fix = f"lower --cv_folds to at most {fewest}, or add patients" if fewest >= 2 else "add patients"
        raise DataError(f"{' and '.join(short)} patient group(s) cannot give each of {k} folds films of both "
                        f"classes; {fix}")
    rng = random.Random(seed)
    fold_of = [0] * len(records)
    for own in by_class:
        rng.shuffle(own)
        own.sort(key=len, reverse=True)  # big groups first, so that the greedy deal stays balanced
        sizes = [0] * k
        for g in own:
            f = min(range(k), key=lambda j: (sizes[j], j))
            sizes[f] += len(g)
            for i in g:
                fold_of[i] = f
    return fold_of


def to_imageset(records: list[Record], decoded: dict[str, np.ndarray], size: int) -> ImageSet:
    images = np.stack([decoded[r.sha1] for r in records]) if records else np.zeros((0, size, size), np.uint8)
    return ImageSet(
        images=torch.from_numpy(images),
        labels=torch.tensor([r.label for r in records], dtype=torch.long),
        paths=[str(r.path) for r in records],
        patients=[r.patient for r in records],
    )


def _resolve_cache(cache_dir: str) -> Path | None:
    if cache_dir.lower() == "none":
        return None
    return Path(cache_dir) if cache_dir else default_cache_dir()


def _usable(records: list[Record], bad: list[tuple[str, str]]) -> list[Record]:
    bad_paths = {p for p, _ in bad}
    return [r for r in records if str(r.path) not in bad_paths]


def prepare_data(data_dir: str, image_size: int, val_fraction: float = 0.15, min_val_images: int = 100,
                 seed: int = 42, strict: bool = False, cache_dir: str = "", cv_folds: int = 0,
                 cv_fold: int = 0, cv_holdout: bool = False, patients_csv: str = "",
                 patients_csv_sha256: str = "") -> DataSplits:
    """Discover, check, decode and split a data set for training.

    Validation comes from ``val/`` when it holds at least ``min_val_images`` images;
    otherwise it is built from ``train/`` (plus the tiny ``val/``) by patient. With
    ``cv_folds`` = k > 0, ``train/`` and ``val/`` are pooled and dealt into k patient-level
    folds (``patient_folds``), and fold ``cv_fold`` is the validation split; with ``cv_holdout``
    the usual validation split is first set aside (the ``val/`` folder where it holds at least
    ``min_val_images`` images, else the patient-level split of ``val_fraction`` and ``seed``) and only
    the rest (``train/`` alone, where ``val/`` is held out) is dealt, so that models of every fold leave
    the same patients unseen (to calibrate and check their ensemble, ``ensemble.write_ensemble``).
    ``test/`` is decoded for the single final evaluation only. Patients: ``patients_csv`` when given
    (``assign_patients``), else each file's DICOM PatientID or Kermany-style name (``file_patient``).

    Raises:
        DataError: the layout is wrong, or ``strict`` and some files cannot be decoded
            (every bad file is named), or too few images remain.
    """
    root = find_dataset_root(data_dir)
    found = discover_splits(root, dicom_ids=not patients_csv)
    all_records = [r for recs in found.values() if recs for r in recs]
    # CSV rows name files below the root (train/NORMAL/a.jpg) or by a name found once
    if patients_csv and patients_csv_sha256 and file_sha256(patients_csv) != patients_csv_sha256:
        raise DataError(f"the patients CSV {patients_csv} has changed since the model was trained, so its "
                        f"patient split cannot be rebuilt; restore the file, or train again")
    set_patients(all_records, patients_csv, root)
    log.info("data set root %s: %s", root, ", ".join(
        f"{s}={len(v) if v is not None else 'absent'}" for s, v in found.items()))
    decoded, bad = decode_records(all_records, image_size, _resolve_cache(cache_dir))
    if bad:
        listing = "\n".join(f"  {p}: {why}" for p, why in bad)
        if strict:
            raise DataError(f"{len(bad)} file(s) cannot be used (--strict stops here, nothing trained):\n{listing}")
        log.warning("skipping %d file(s) that cannot be used:\n%s", len(bad), listing)

    train_recs = _usable(found["train"] or [], bad)
    val_recs = _usable(found["val"] or [], bad)
    info: dict = {"root": str(root), "bad_files": len(bad)}
    val_classes = {r.label for r in val_recs}
    val_folder_used = len(val_recs) >= min_val_images and len(val_classes) == len(CLASS_NAMES)
    if found["val"] and len(val_classes) < len(CLASS_NAMES):
        log.warning("val/ holds no %s films, so it cannot validate (sensitivity, AUROC and the threshold need both "
                    "classes): its films are pooled with train/", " or ".join(
                        c for i, c in enumerate(CLASS_NAMES) if i not in val_classes))
    if cv_folds:
        if not 0 <= cv_fold < cv_folds:
            raise DataError(f"cv_fold must be in 0..{cv_folds - 1}, got {cv_fold}")
        # the usual validation patients are those the plain split validates on: the val/ folder where it is used
        # (an ensemble of the folds is calibrated on them, so no fold may train on them), else a patient split
        holdout_is_val_folder = cv_holdout and val_folder_used
        if holdout_is_val_folder:
            val_hashes = {r.sha1 for r in val_recs}
            pool, n_dup = dedupe([r for r in train_recs if r.sha1 not in val_hashes])
        else:
            pool, n_dup = dedupe(train_recs + val_recs)
            if cv_holdout:
                pool, _ = patient_split(pool, val_fraction, seed)
        fold_of = patient_folds(pool, cv_folds, seed)
        train_recs = [r for r, f in zip(pool, fold_of) if f != cv_fold]
        val_recs = [r for r, f in zip(pool, fold_of) if f == cv_fold]
        info["validation"] = (f"fold {cv_fold} of {cv_folds} patient-level folds of train/ (seed {seed}), the val/ "
                              f"folder held out" if holdout_is_val_folder else
                              f"fold {cv_fold} of {cv_folds} patient-level folds of train/ + val/ (seed {seed})"
                              + (f", {val_fraction:.0%} of patients held out" if cv_holdout else ""))
        info["duplicates_dropped"] = n_dup
        log.info("validation %s; dropped %d byte-identical duplicate(s)", info["validation"], n_dup)
    elif val_folder_used:
        info["validation"] = "val/ folder"
        val_hashes = {r.sha1 for r in val_recs}
        leaked = [r for r in train_recs if r.sha1 in val_hashes]
        if leaked:
            log.warning("dropping %d train/ file(s) byte-identical to val/ files, so validation stays unseen: %s",
                        len(leaked), ", ".join(r.path.name for r in leaked[:10]))
            train_recs = [r for r in train_recs if r.sha1 not in val_hashes]
        info["duplicates_dropped"] = len(leaked)
    else:
        why = ("missing" if found["val"] is None else f"only {len(val_recs)} images" if len(val_recs) < min_val_images
               else "of one class")
        pool = train_recs + val_recs
        pool, n_dup = dedupe(pool)
        train_recs, val_recs = patient_split(pool, val_fraction, seed)
        info["validation"] = (f"built from train/ by patient ({val_fraction:.0%} of patients per class, "
                              f"seed {seed}) because val/ is {why}")
        info["duplicates_dropped"] = n_dup
        log.info("validation %s; dropped %d byte-identical duplicate(s)", info["validation"], n_dup)
    train_recs, _ = dedupe(train_recs)
    val_recs, _ = dedupe(val_recs)
    test_recs = _usable(found["test"] or [], bad) if found["test"] is not None else None
    _warn_shared_patients(train_recs, val_recs, "val/" if info["validation"] == "val/ folder" else "")
    _warn_shared_patients(train_recs, test_recs or [], "test/")
    for name, recs in (("train", train_recs), ("val", val_recs)):
        labels = {r.label for r in recs}
        if len(labels) < len(CLASS_NAMES):
            raise DataError(f"{name} split needs images of both classes; got {len(recs)} image(s) "
                            f"of {sorted(CLASS_NAMES[i] for i in labels)} (add data or lower --val_fraction)")
    splits = DataSplits(
        train=to_imageset(train_recs, decoded, image_size),
        val=to_imageset(val_recs, decoded, image_size),
        test=to_imageset(test_recs, decoded, image_size) if test_recs else None,
        bad_files=bad,
        info=info,
    )
    for name in ("train", "val", "test"):
        s = getattr(splits, name)
        if s is not None:
            info[name] = {"images": len(s), "patients": len(set(s.patients)), **s.class_counts()}
            log.info("%-5s %5d images, %4d patients, %s", name, len(s), len(set(s.patients)), s.class_counts())
    return splits


def patients_digest(patients: list[str]) -> str:
    """SHA-256 of a set of patient IDs (order and repeats do not count): which patients a split holds."""
    return hashlib.sha256("\n".join(sorted(set(map(str, patients)))).encode()).hexdigest()


def check_validated_on(config: dict, val: ImageSet, what: str, data_dir: str, fix: str) -> None:
    """Refuse a model whose run recorded other validation patients (``val_patients_sha256``) than ``val``, the
    validation split its ``config`` makes of ``data_dir`` (``split_from_config``): it was trained on another data
    folder, or films were added or removed since, so some of ``val``'s films may be ones it trained on. ``what``
    names the model, ``fix`` says what to do. Runs from before the record are not checked.

    Raises:
        CheckpointError: the patients differ.
    """
    stored = config.get("val_patients_sha256")
    if stored and stored != patients_digest(val.patients):
        raise CheckpointError(f"{what} was validated on other patients than its validation split of {data_dir} holds "
                              f"(another data folder, or films added or removed since it trained), so it may have "
                              f"trained on films it would be scored on: {fix}")


SPLIT_KEYS = ("seed", "val_fraction", "min_val_images", "patients_csv_sha256", "cv_folds", "cv_fold", "cv_holdout")


def _warn_shared_patients(train_recs: list[Record], other: list[Record], folder: str) -> None:
    """Warn when a given ``folder`` (val/ or test/) shares patients or identical files with the training films:
    its figures would then not be those of new patients. pneumoscan's own splits never share any."""
    if not folder or not other:
        return
    patients = {r.patient for r in train_recs if r.patient}
    hashes = {r.sha1 for r in train_recs if r.sha1}
    shared = sorted({r.patient for r in other if r.patient and r.patient in patients})
    same = sum(bool(r.sha1) and r.sha1 in hashes for r in other)
    if shared or same:
        log.warning("%s shares %d patient(s) (%d of its %d film(s)) and %d identical file(s) with the training "
                    "films (patients as the split reads them: PatientID, Kermany file names, --patients): its "
                    "figures are not those of new patients; move those patients to one side (e.g. %s)",
                    folder, len(shared), sum(r.patient in set(shared) for r in other), len(other), same,
                    ", ".join(shared[:5]) or "see the identical files")


def split_record(config: dict) -> dict:
    """What fixes the patients a run with ``config`` trained on: its split fields, and (``init_split``) those of
    the checkpoint it was fine-tuned from, if any; training stores it for ``--init_from`` (the ensemble check
    reads it)."""
    return {**{k: config[k] for k in SPLIT_KEYS if k in config}, "init_from": config.get("init_from", ""),
            "init_split": config.get("init_split") or {}}


def split_from_config(config: dict, data_dir: str, image_size: int, cache_dir: str = "") -> DataSplits:
    """The same splits a training run with ``config`` (a checkpoint's stored config) made, at ``image_size``."""
    return prepare_data(data_dir, image_size, config.get("val_fraction", 0.15), config.get("min_val_images", 100),
                        config.get("seed", 42), cache_dir=cache_dir, cv_folds=config.get("cv_folds", 0),
                        cv_fold=config.get("cv_fold", 0), cv_holdout=config.get("cv_holdout", False),
                        patients_csv=config.get("patients_csv", ""),
                        patients_csv_sha256=config.get("patients_csv_sha256", ""))


def load_labelled_folder(data_dir: str, image_size: int, split: str = "test", cache_dir: str = "",
                         patients_csv: str = "") -> tuple[ImageSet, list[tuple[str, str]]]:
    """Images of a folder holding NORMAL/ and PNEUMONIA/, or of ``split`` under a data set root.

    Each film's patient comes from ``patients_csv`` when given (``assign_patients``), else from its
    DICOM PatientID or its Kermany-style file name (``file_patient``).

    Returns the films and those left out with why (unreadable, not frontal, byte-identical copies).

    Raises:
        DataError: neither layout is found, the patients CSV does not fit the films, or no usable
            image remains.
    """
    base = existing_folder(data_dir)
    if _child_named(base, CLASS_NAMES[0]) is not None or _child_named(base, CLASS_NAMES[1]) is not None:
        folder = base
    else:
        root = find_dataset_root(base) if _child_named(base, split) is None else base
        folder = _child_named(root, split)
        if folder is None:
            raise DataError(f"{root} has no {split}/ folder; pass a folder holding NORMAL/ and PNEUMONIA/ "
                            f"or a data set root with {split}/")
    records = discover_labelled(folder, dicom_ids=not patients_csv)
    set_patients(records, patients_csv, folder)
    decoded, bad = decode_records(records, image_size, _resolve_cache(cache_dir))
    for p, why in bad:
        log.warning("skipping %s: %s", p, why)
    usable = _usable(records, bad)
    if not usable:
        raise DataError(f"{folder}: none of the {len(records)} images could be decoded")
    usable, copies = dedupe_records(usable)  # a film counted twice would narrow the CIs; one in both classes: no label
    if copies:
        log.warning("%s: %d film(s) left out as byte-identical copies: a film is counted once, and one filed in both "
                    "classes not at all (each in the left-out list)", folder, len(copies))
    if not usable:
        raise DataError(f"{folder}: every film has a byte-identical copy in the other class folder: no label is left")
    return to_imageset(usable, decoded, image_size), bad + copies
