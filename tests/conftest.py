"""Shared fixtures: the real chest X-ray data beside the repo, bad files, and one trained model.

Real data is read from ``../shared/data`` relative to the repository root and is never copied
into the repo; tests that need it skip with a reason when it is absent. Small data sets are
built in pytest's tmp folders from symlinks to the real files.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from pneumoscan.data import Record, discover_labelled
from pneumoscan.predict import CLASS_NAMES

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = REPO_ROOT.parent / "shared" / "data"
TRAIN_DIR = DATA_ROOT / "chest_xray" / "train"
FULLRES_DIR = DATA_ROOT / "fullres_sample"

# The training smoke run: small real subset, tiny input, one epoch.
SMOKE_N = {"NORMAL": 60, "PNEUMONIA": 90}
SMOKE_ARGS = ["--image_size", "64", "--epochs", "1", "--batch_size", "16", "--device", "cpu", "--seed", "0"]


def _require_dir(path: Path) -> Path:
    if not path.is_dir():
        pytest.skip(f"real chest X-ray data not found at {path} (expected ../shared/data beside the repo; "
                    f"see ../shared/data/README.md)")
    return path


@pytest.fixture(scope="session")
def train_dir() -> Path:
    """``../shared/data/chest_xray/train`` (NORMAL/ and PNEUMONIA/, 224 px JPEGs)."""
    _require_dir(TRAIN_DIR / "NORMAL")
    _require_dir(TRAIN_DIR / "PNEUMONIA")
    return TRAIN_DIR


@pytest.fixture(scope="session")
def fullres_dir() -> Path:
    """``../shared/data/fullres_sample`` (full-size originals)."""
    _require_dir(FULLRES_DIR / "NORMAL")
    _require_dir(FULLRES_DIR / "PNEUMONIA")
    return FULLRES_DIR


def sha1_of(path: Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def real_records(train_dir) -> list[Record]:
    """Every record of the real train/ folder with its content hash filled in (read-only: copy before changing)."""
    records = discover_labelled(train_dir)
    for r in records:
        r.sha1 = sha1_of(r.path)
    return records


@pytest.fixture(scope="session")
def real_jpeg(train_dir) -> Path:
    """One real 224 px chest X-ray JPEG."""
    return sorted((train_dir / "NORMAL").iterdir())[0]


def write_bad_files(folder: Path, good_jpeg: Path) -> dict[str, Path]:
    """An empty file, a text file named .jpg and a truncated JPEG, in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    empty = folder / "empty.jpg"
    empty.write_bytes(b"")
    text = folder / "notes.jpg"
    text.write_text("this is a text file, not a radiograph\n")
    data = good_jpeg.read_bytes()
    truncated = folder / "truncated.jpeg"
    truncated.write_bytes(data[: len(data) // 2])
    return {"empty": empty, "text": text, "truncated": truncated}


@pytest.fixture(scope="session")
def make_bad_files(real_jpeg):
    """``make_bad_files(folder)`` writes an empty .jpg, a text file named .jpg and a truncated JPEG there."""
    return lambda folder: write_bad_files(folder, real_jpeg)


def choose_subset(records: list[Record], counts: dict[str, int]) -> dict[str, list[Path]]:
    """A deterministic subset per class: about half from patients with 2-4 images, the rest single images.

    Also pulls in one group of byte-identical files per class when there is one, so the
    pipeline's duplicate handling runs on real data.
    """
    chosen: dict[str, list[Path]] = {}
    for label, cls in enumerate(CLASS_NAMES):
        own = [r for r in records if r.label == label]
        by_patient: dict[str, list[Record]] = collections.defaultdict(list)
        for r in own:
            by_patient[r.patient].append(r)
        by_hash = collections.Counter(r.sha1 for r in own)
        picked: list[Record] = []
        dup_patients = sorted({r.patient for r in own if by_hash[r.sha1] > 1 and len(by_patient[r.patient]) <= 4})
        multi = [p for p in sorted(by_patient) if 2 <= len(by_patient[p]) <= 4]
        single = [p for p in sorted(by_patient) if len(by_patient[p]) == 1]
        target = counts[cls]
        for p in dup_patients[:1] + multi[::7]:
            if len(picked) + len(by_patient[p]) > target // 2:
                break
            picked += [r for r in by_patient[p] if r not in picked]
        for p in single[::5]:
            if len(picked) >= target:
                break
            picked += by_patient[p]
        chosen[cls] = [r.path for r in picked]
    return chosen


def link_dataset(root: Path, files: dict[str, list[Path]], split: str = "train") -> Path:
    """``root/split/CLASS/`` holding symlinks to the given real files; returns ``root``."""
    for cls, paths in files.items():
        folder = root / split / cls
        folder.mkdir(parents=True, exist_ok=True)
        for p in paths:
            (folder / p.name).symlink_to(p)
    return root


@pytest.fixture(scope="session")
def smoke_args() -> list[str]:
    """The training flags of the smoke run (besides the folders)."""
    return list(SMOKE_ARGS)


@pytest.fixture(scope="session")
def make_dataset():
    """``make_dataset(root, {cls: [real paths]})`` builds ``root/train/CLASS/`` of symlinks."""
    return link_dataset


@pytest.fixture(scope="session")
def smoke_files(real_records) -> dict[str, list[Path]]:
    files = choose_subset(real_records, SMOKE_N)
    for cls, paths in files.items():
        patients = collections.Counter(r.patient for r in real_records if r.path in set(paths))
        assert sum(1 for n in patients.values() if n > 1) >= 3, f"subset for {cls} lacks multi-image patients"
    return files


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory, smoke_files) -> Path:
    """``DATA/train/{NORMAL,PNEUMONIA}`` of ~60 + ~90 real images (symlinks)."""
    return link_dataset(tmp_path_factory.mktemp("smoke") / "data", smoke_files)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, smoke_data) -> SimpleNamespace:
    """One epoch of ``pneumoscan train`` on the smoke data, run once per session; later tests reuse the model."""
    from pneumoscan.cli import train_main

    base = tmp_path_factory.mktemp("trained")
    out, cache = base / "run", base / "cache"
    argv = ["--data_dir", str(smoke_data), "--output_dir", str(out), "--cache_dir", str(cache), *SMOKE_ARGS]
    code = train_main(argv)
    _reset_package_logging()
    return SimpleNamespace(code=code, out=out, cache=cache, data=smoke_data, argv=argv,
                           model_path=out / "medical_cnn_model.pth")


@pytest.fixture(scope="session")
def trained_model(trained_run) -> Path:
    """Path of the model the smoke run wrote; fails clearly if that run did not succeed."""
    assert trained_run.code == 0, f"training smoke run failed with exit code {trained_run.code}"
    assert trained_run.model_path.is_file()
    return trained_run.model_path


@pytest.fixture(scope="session")
def nan_model(trained_model, tmp_path_factory) -> Path:
    """The smoke model with one output bias made NaN: a damaged file whose outputs are not finite."""
    from pneumoscan.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(trained_model)
    ckpt["model_state"]["fc2.bias"][1] = float("nan")
    path = tmp_path_factory.mktemp("nan") / "nan.pth"
    save_checkpoint(ckpt, path)
    return path


def _reset_package_logging() -> None:
    """Undo ``cli.configure_logging``: close its file/stream handlers so nothing leaks between tests."""
    root = logging.getLogger("pneumoscan")
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.propagate = True
    root.setLevel(logging.NOTSET)


@pytest.fixture(autouse=True)
def _clean_package_logging():
    yield
    _reset_package_logging()


@pytest.fixture(autouse=True, scope="session")
def _no_home_cache(tmp_path_factory):
    """Keep the default decoded-image cache (``~/.cache/pneumoscan``) out of the user's home."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture
def experiment(monkeypatch):
    """Loads experiments/NAME.py as a module (experiments/ is not a package; its scripts import each other)."""
    import importlib.util
    import sys

    monkeypatch.syspath_prepend(str(EXPERIMENTS))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"{name}_under_test", EXPERIMENTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module

    return load
