"""data.py: finding the data set root, listing class folders, decoding with the cache, prepare_data.

Layouts are built in tmp folders from a handful of real images (copies, symlinks and
PNG conversions); nothing is written into the repo or into ../shared.
"""

from __future__ import annotations

import collections
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pneumoscan.data as data_mod
from pneumoscan.data import (
    decode_records,
    discover_labelled,
    discover_splits,
    find_dataset_root,
    list_images,
    load_labelled_folder,
    prepare_data,
)
from pneumoscan.errors import DataError


@pytest.fixture(scope="module")
def few_images(train_dir) -> dict[str, list[Path]]:
    """Four real files per class, the first two of one patient where possible."""
    normal = sorted((train_dir / "NORMAL").glob("IM-0*.jpeg"))[:4]
    pneumonia = sorted((train_dir / "PNEUMONIA").glob("person1_*.jpeg"))[:2]
    pneumonia += sorted((train_dir / "PNEUMONIA").glob("person13_*.jpeg"))[:2]
    assert len(normal) == 4 and len(pneumonia) == 4
    return {"NORMAL": normal, "PNEUMONIA": pneumonia}


def make_class_dirs(split_dir: Path, files: dict[str, list[Path]], upper: bool = False, png: bool = False) -> None:
    """split_dir/CLASS/ with real images: symlinked, or renamed to .JPG, or converted to .PNG."""
    for cls, paths in files.items():
        folder = split_dir / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i, p in enumerate(paths):
            if png and i % 2:
                Image.open(p).save(folder / (p.stem + ".PNG"))
            elif upper:
                shutil.copyfile(p, folder / (p.stem + ".JPG"))
            else:
                (folder / p.name).symlink_to(p)


def add_mac_litter(folder: Path) -> None:
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    for cls in ("NORMAL", "PNEUMONIA"):
        d = folder / cls
        if d.is_dir():
            (d / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
            (d / "._IM-0001-0001.jpeg").write_bytes(b"\x00\x05\x16\x07AppleDouble")


def test_plain_layout(tmp_path, few_images):
    make_class_dirs(tmp_path / "train", few_images)
    assert find_dataset_root(tmp_path) == tmp_path
    records = discover_labelled(tmp_path / "train")
    assert [r.label for r in records] == [0] * 4 + [1] * 4
    assert {r.path.name for r in records} == {p.name for ps in few_images.values() for p in ps}
    patients = collections.Counter(r.patient for r in records if r.label == 1)
    assert patients == {"person1": 2, "person13": 2}


def test_nested_kaggle_zip_layout_with_macosx_and_ds_store(tmp_path, few_images):
    root = tmp_path / "download" / "chest_xray" / "chest_xray"
    make_class_dirs(root / "train", few_images, upper=True)
    make_class_dirs(root / "test", few_images, png=True)
    add_mac_litter(root / "train")
    add_mac_litter(root / "test")
    # The zip's __MACOSX mirror holds a train/ too; it must never be chosen.
    mac = tmp_path / "download" / "__MACOSX" / "chest_xray" / "train" / "NORMAL"
    mac.mkdir(parents=True)
    (mac / "._IM-0115-0001.jpeg").write_bytes(b"\x00\x05\x16\x07")
    (tmp_path / "download" / ".DS_Store").write_bytes(b"junk")

    found = find_dataset_root(tmp_path / "download")
    assert found == root
    splits = discover_splits(found)
    assert splits["val"] is None
    assert len(splits["train"]) == 8 and len(splits["test"]) == 8
    assert {p.suffix for p in (r.path for r in splits["train"])} == {".JPG"}
    assert {p.suffix for p in (r.path for r in splits["test"])} == {".jpeg", ".PNG"}
    assert not any("__MACOSX" in str(r.path) or r.path.name.startswith(".") for r in splits["train"])


def test_macosx_inside_a_class_folder_and_non_images_are_ignored(tmp_path, few_images):
    make_class_dirs(tmp_path / "train", few_images)
    junk = tmp_path / "train" / "NORMAL" / "__MACOSX"
    junk.mkdir()
    (junk / "IM-9999-0001.jpeg").write_bytes(b"not really")
    (tmp_path / "train" / "NORMAL" / "readme.txt").write_text("hello")
    images, ignored = list_images(tmp_path / "train" / "NORMAL")
    assert len(images) == 4 and ignored == 1
    assert len(discover_labelled(tmp_path / "train")) == 8


def test_case_insensitive_folder_names(tmp_path, few_images):
    make_class_dirs(tmp_path / "Train", {k.lower(): v for k, v in few_images.items()})
    assert find_dataset_root(tmp_path) == tmp_path
    assert len(discover_splits(tmp_path)["train"]) == 8


def test_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        find_dataset_root(tmp_path / "nope")


def test_no_train_folder_names_what_is_there(tmp_path, few_images):
    make_class_dirs(tmp_path / "images", few_images)
    (tmp_path / "validation").mkdir()
    with pytest.raises(DataError) as info:
        find_dataset_root(tmp_path)
    message = str(info.value)
    assert "train/" in message
    assert "images" in message and "validation" in message


def test_train_folder_too_deep_is_not_found(tmp_path, few_images):
    make_class_dirs(tmp_path / "a" / "b" / "c" / "train", few_images)
    with pytest.raises(DataError, match="train/"):
        find_dataset_root(tmp_path)


def test_missing_class_folder_is_named(tmp_path, few_images):
    make_class_dirs(tmp_path / "train", {"NORMAL": few_images["NORMAL"]})
    (tmp_path / "train" / "COVID").mkdir()
    with pytest.raises(DataError) as info:
        discover_labelled(tmp_path / "train")
    message = str(info.value)
    assert "PNEUMONIA" in message and "missing" in message
    assert "COVID" in message  # says what was found instead


def test_linked_folders_are_read_once_and_folders_beside_the_classes_are_named(tmp_path, few_images, caplog):
    make_class_dirs(tmp_path / "train", {"NORMAL": few_images["NORMAL"][:2], "PNEUMONIA": few_images["PNEUMONIA"]})
    batch = tmp_path / "batch2"
    batch.mkdir()
    for f in few_images["NORMAL"][2:]:
        (batch / f.name).symlink_to(f)
    (tmp_path / "train" / "NORMAL" / "batch2").symlink_to(batch)
    (batch / "loop").symlink_to(tmp_path / "train" / "NORMAL")
    (tmp_path / "train" / "COVID").mkdir()
    (tmp_path / "train" / "loose.jpeg").symlink_to(few_images["NORMAL"][0])
    records = discover_labelled(tmp_path / "train")
    assert sorted(r.path.name for r in records if r.label == 0) == sorted(f.name for f in few_images["NORMAL"])
    assert "COVID/, loose.jpeg left out" in caplog.text and "already listed" in caplog.text


def test_empty_class_folder_is_named(tmp_path, few_images):
    make_class_dirs(tmp_path / "train", {"NORMAL": few_images["NORMAL"]})
    empty = tmp_path / "train" / "PNEUMONIA"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"junk")
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(DataError) as info:
        discover_labelled(tmp_path / "train")
    assert "PNEUMONIA" in str(info.value) and "no .jpg" in str(info.value)


def _records_for(tmp_path, few_images):
    make_class_dirs(tmp_path / "train", few_images)
    return discover_labelled(tmp_path / "train")


def test_decode_records_fills_hashes_and_uses_the_cache(tmp_path, few_images, monkeypatch):
    records = _records_for(tmp_path, few_images)
    cache_dir = tmp_path / "cache"
    decoded, bad = decode_records(records, 32, cache_dir, workers=2)
    assert bad == []
    assert all(len(r.sha1) == 40 for r in records)
    assert set(decoded) == {r.sha1 for r in records}
    for arr in decoded.values():
        assert arr.shape == (32, 32) and arr.dtype == np.uint8
    assert len(list(cache_dir.glob("images-32px-*.npz"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the cache holds every image")

    monkeypatch.setattr(data_mod, "decode_image", no_decoding)
    fresh = discover_labelled(tmp_path / "train")
    again, bad = decode_records(fresh, 32, cache_dir, workers=2)
    assert bad == []
    assert set(again) == set(decoded)
    for h in decoded:
        np.testing.assert_array_equal(again[h], decoded[h])


@pytest.mark.parametrize("damage", ["cut_in_half", "empty", "other_size"])
def test_a_damaged_cache_is_ignored_and_rewritten(tmp_path, few_images, damage, caplog):
    records = _records_for(tmp_path, few_images)
    cache_dir = tmp_path / "cache"
    decoded, _ = decode_records(records, 32, cache_dir, workers=2)
    cache_file = next(cache_dir.glob("images-32px-*.npz"))
    if damage == "cut_in_half":
        cache_file.write_bytes(cache_file.read_bytes()[: cache_file.stat().st_size // 2])
    elif damage == "empty":
        cache_file.write_bytes(b"")
    else:  # a file of this name holding images of another size
        np.savez(cache_file, hashes=np.array([r.sha1 for r in records]),
                 images=np.zeros((len(records), 16, 16), np.uint8))
    again, bad = decode_records(discover_labelled(tmp_path / "train"), 32, cache_dir, workers=2)
    assert bad == [] and set(again) == set(decoded)
    for h in decoded:
        np.testing.assert_array_equal(again[h], decoded[h])
    assert "ignoring unreadable image cache" in caplog.text
    with np.load(cache_file) as z:  # written again, whole
        assert z["images"].shape == (len(decoded), 32, 32)


def test_decode_records_reports_every_bad_file(tmp_path, few_images, make_bad_files):
    make_class_dirs(tmp_path / "train", few_images)
    bad_files = make_bad_files(tmp_path / "train" / "NORMAL")
    records = discover_labelled(tmp_path / "train")
    decoded, bad = decode_records(records, 32, None, workers=2)
    assert sorted(p for p, _ in bad) == sorted(str(p) for p in bad_files.values())
    reasons = dict(bad)
    assert "empty" in reasons[str(bad_files["empty"])]
    assert "not a recognised image" in reasons[str(bad_files["text"])]
    assert "truncated" in reasons[str(bad_files["truncated"])]
    assert len(decoded) == 8


def test_prepare_data_strict_names_bad_files_and_lenient_lists_them(tmp_path, few_images, make_bad_files):
    make_class_dirs(tmp_path / "data" / "train", few_images)
    bad = make_bad_files(tmp_path / "data" / "train" / "PNEUMONIA")
    with pytest.raises(DataError) as info:
        prepare_data(str(tmp_path / "data"), 32, val_fraction=0.3, seed=1, strict=True, cache_dir="none")
    for p in bad.values():
        assert str(p) in str(info.value)
    splits = prepare_data(str(tmp_path / "data"), 32, val_fraction=0.3, seed=1, strict=False, cache_dir="none")
    assert sorted(p for p, _ in splits.bad_files) == sorted(str(p) for p in bad.values())
    assert len(splits.train) + len(splits.val) == 8
    assert not set(splits.train.patients) & set(splits.val.patients)
    assert splits.train.images.shape[1:] == (32, 32)
    assert "built from train/ by patient" in splits.info["validation"]


def test_load_labelled_folder_accepts_class_folders_or_a_root(tmp_path, few_images):
    make_class_dirs(tmp_path / "root" / "test", few_images)
    make_class_dirs(tmp_path / "root" / "train", few_images)
    by_root, bad = load_labelled_folder(str(tmp_path / "root"), 32, "test", cache_dir="none")
    by_folder, _ = load_labelled_folder(str(tmp_path / "root" / "test"), 32, cache_dir="none")
    assert bad == [] and len(by_root) == len(by_folder) == 8
    assert by_root.class_counts() == {"NORMAL": 4, "PNEUMONIA": 4}
    with pytest.raises(DataError, match="val/"):
        load_labelled_folder(str(tmp_path / "root"), 32, "val", cache_dir="none")


def test_user_val_folder_duplicates_are_dropped_from_train(tmp_path, train_dir):
    normal = sorted((train_dir / "NORMAL").glob("*.jpeg"))[:6]
    pneumonia = sorted((train_dir / "PNEUMONIA").glob("*.jpeg"))[:6]
    for split, part in (("train", slice(0, 4)), ("val", slice(4, 6))):
        for cls, files in (("NORMAL", normal), ("PNEUMONIA", pneumonia)):
            folder = tmp_path / "data" / split / cls
            folder.mkdir(parents=True)
            for f in files[part]:
                shutil.copy(f, folder / f.name)
    shutil.copy(normal[4], tmp_path / "data" / "train" / "NORMAL" / "copy_of_a_val_image.jpeg")
    splits = prepare_data(str(tmp_path / "data"), 32, min_val_images=4, cache_dir="none")
    assert splits.info["validation"] == "val/ folder"
    assert not any(p.endswith("copy_of_a_val_image.jpeg") for p in splits.train.paths)
    assert splits.info["duplicates_dropped"] == 1
    assert len(splits.train) == 8 and len(splits.val) == 4


def _train_and_val_folders(root: Path, train_dir: Path, n_train: int = 8, n_val: int = 3) -> None:
    for cls in ("NORMAL", "PNEUMONIA"):
        files = sorted((train_dir / cls).glob("*.jpeg"))[: n_train + n_val]
        for split, part in (("train", files[:n_train]), ("val", files[n_train:])):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for f in part:
                (root / split / cls / f.name).symlink_to(f)


def test_cv_holdout_holds_out_the_val_folder_the_plain_split_validates_on(tmp_path, train_dir):
    _train_and_val_folders(tmp_path / "data", train_dir)
    plain = prepare_data(str(tmp_path / "data"), 32, min_val_images=6, cache_dir="none")
    assert plain.info["validation"] == "val/ folder"
    held_out = set(plain.val.paths)
    for fold in range(2):
        split = prepare_data(str(tmp_path / "data"), 32, min_val_images=6, cache_dir="none", cv_folds=2,
                             cv_fold=fold, cv_holdout=True)
        assert not held_out & (set(split.train.paths) | set(split.val.paths)), "a fold trained on val/ films"
        assert "val/ folder held out" in split.info["validation"]


def test_a_val_folder_sharing_patients_with_train_is_warned_about(tmp_path, train_dir, caplog):
    _train_and_val_folders(tmp_path / "data", train_dir)
    # one patient's two films, one on each side
    by_patient = collections.defaultdict(list)
    for f in sorted((train_dir / "PNEUMONIA").glob("person*.jpeg"))[20:]:
        by_patient[data_mod.patient_id(f.name)].append(f)
    patient, (first, second, *_) = next((k, v) for k, v in by_patient.items() if len(v) >= 2)
    (tmp_path / "data" / "train" / "PNEUMONIA" / first.name).symlink_to(first)
    (tmp_path / "data" / "val" / "PNEUMONIA" / second.name).symlink_to(second)
    caplog.set_level("WARNING", logger="pneumoscan")
    prepare_data(str(tmp_path / "data"), 32, min_val_images=6, cache_dir="none")
    assert any("val/ shares 1 patient" in r.getMessage() and patient in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("split", ["val", "test"])
def test_an_empty_val_or_test_folder_counts_as_absent(tmp_path, few_images, split, caplog):
    make_class_dirs(tmp_path / "train", few_images)
    for cls in ("NORMAL", "PNEUMONIA"):  # the folders left after moving the official val/ films into train/
        (tmp_path / split / cls).mkdir(parents=True)
    (tmp_path / split / "NORMAL" / ".DS_Store").write_bytes(b"junk")
    found = discover_splits(tmp_path)
    assert found[split] is None and len(found["train"]) == 8
    assert f"{tmp_path / split} holds no films: treated as absent" in caplog.text
    (tmp_path / split / "NORMAL" / few_images["NORMAL"][0].name).symlink_to(few_images["NORMAL"][0])
    if split == "test":  # a test split with films but a class missing is still an error, that says what to do
        with pytest.raises(DataError, match="PNEUMONIA.*a test split needs films of both classes.*move test/ out"):
            discover_splits(tmp_path)
    else:  # a val/ of one class cannot validate: read, then pooled with train/ (prepare_data)
        assert [r.path.name for r in discover_splits(tmp_path)["val"]] == [few_images["NORMAL"][0].name]


def test_a_val_folder_of_one_class_is_pooled_with_train_not_refused(tmp_path, train_dir, caplog):
    _train_and_val_folders(tmp_path / "data", train_dir)
    for f in (tmp_path / "data" / "val" / "PNEUMONIA").iterdir():  # the README: such a val/ is pooled into train/
        f.unlink()
    caplog.set_level("WARNING", logger="pneumoscan")
    splits = prepare_data(str(tmp_path / "data"), 32, min_val_images=2, cache_dir="none")
    assert splits.info["validation"].endswith("because val/ is of one class")
    assert set(splits.val.labels.tolist()) == {0, 1} and len(splits.train) + len(splits.val) == 19
    assert "val/ holds no PNEUMONIA films, so it cannot validate" in caplog.text


def test_an_evaluation_folder_counts_each_film_once(tmp_path, few_images, caplog):
    from pneumoscan.data import left_out_kind, load_labelled_folder

    make_class_dirs(tmp_path / "eval", few_images)
    normal, pneumonia = few_images["NORMAL"], few_images["PNEUMONIA"]
    (tmp_path / "eval" / "NORMAL" / "copy_of_a_normal.jpeg").symlink_to(normal[0])  # counted once
    (tmp_path / "eval" / "NORMAL" / "mislabelled.jpeg").symlink_to(pneumonia[0])  # in both classes: no label
    data, bad = load_labelled_folder(str(tmp_path / "eval"), 32, cache_dir="none")
    assert len(data) == 7 and data.class_counts() == {"NORMAL": 4, "PNEUMONIA": 3}
    assert "3 film(s) left out as byte-identical copies" in caplog.text and "filed under the other class" in caplog.text
    # each left-out film is listed with its reason (the JSON's skipped_files), both sides of a conflict named
    why = {Path(p).name: r for p, r in bad}
    assert set(why) == {"copy_of_a_normal.jpeg", "mislabelled.jpeg", pneumonia[0].name}
    assert why["copy_of_a_normal.jpeg"].startswith(f"byte-identical copy of {tmp_path / 'eval' / 'NORMAL'}")
    assert "mislabelled.jpeg" in why[pneumonia[0].name] and pneumonia[0].name in why["mislabelled.jpeg"]
    assert {left_out_kind(r) for r in why.values()} == {"duplicate"}
