"""data.py: patient ids from Kermany file names, dedupe, and the patient-level split (real file list)."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from pneumoscan.data import Record, dedupe, patient_folds, patient_groups, patient_id, patient_split
from pneumoscan.errors import DataError
from pneumoscan.predict import CLASS_NAMES


@pytest.mark.parametrize(("filename", "patient"), [
    ("person1_bacteria_1.jpeg", "person1"),
    ("person1_virus_7.jpeg", "person1"),
    ("person1000_bacteria_2931.jpeg", "person1000"),
    ("person1000_virus_1681.jpeg", "person1000"),
    ("person0012_bacteria_3.jpeg", "person12"),
    ("PERSON12_Virus_3.JPEG", "person12"),
    ("IM-0115-0001.jpeg", "IM-0115"),
    ("IM-0115-0002.jpeg", "IM-0115"),
    ("NORMAL2-IM-0115-0001.jpeg", "IM-0115"),
    ("NORMAL2-IM-1427-0001-0002.jpeg", "IM-1427"),
    ("normal2-im-0587-0001.jpg", "IM-0587"),
    ("scan_0042.png", "scan_0042"),
    ("chest xray.jpg", "chest xray"),
    ("person.jpeg", "person"),
    ("IM-abc.jpeg", "IM-abc"),
])
def test_patient_id(filename, patient):
    assert patient_id(filename) == patient


def test_bacteria_and_virus_of_one_person_share_a_patient_but_different_people_do_not():
    assert patient_id("person7_bacteria_1.jpeg") == patient_id("person7_virus_2.jpeg")
    assert patient_id("person7_bacteria_1.jpeg") != patient_id("person71_bacteria_1.jpeg")
    assert patient_id("IM-0001-0001.jpeg") != patient_id("IM-0010-0001.jpeg")


def _check_split(records: list[Record], train: list[Record], val: list[Record]) -> None:
    train_paths, val_paths = {r.path for r in train}, {r.path for r in val}
    assert not train_paths & val_paths
    assert train_paths | val_paths == {r.path for r in records}
    assert len(train) + len(val) == len(records)
    shared_patients = {r.patient for r in train} & {r.patient for r in val}
    assert not shared_patients, f"patients on both sides: {sorted(shared_patients)[:5]}"
    shared_hashes = {r.sha1 for r in train} & {r.sha1 for r in val}
    assert not shared_hashes, f"{len(shared_hashes)} byte-identical group(s) split across train and val"


@pytest.mark.parametrize("seed", [0, 42])
@pytest.mark.parametrize("val_fraction", [0.15, 0.3])
def test_real_split_keeps_patients_and_identical_files_on_one_side(real_records, seed, val_fraction):
    records = list(real_records)
    train, val = patient_split(records, val_fraction, seed)
    _check_split(records, train, val)
    for label, cls in enumerate(CLASS_NAMES):
        total = sum(r.label == label for r in records)
        in_val = sum(r.label == label for r in val)
        assert abs(in_val / total - val_fraction) < 0.03, f"{cls}: {in_val}/{total} in val"


def test_real_data_has_duplicates_that_the_split_must_respect(real_records):
    groups = collections.Counter(r.sha1 for r in real_records)
    assert sum(1 for n in groups.values() if n > 1) > 0, "expected byte-identical files in the real train/"


def test_real_split_is_deterministic_per_seed(real_records):
    records = list(real_records)
    a = [r.path for r in patient_split(records, 0.15, 7)[1]]
    b = [r.path for r in patient_split(records, 0.15, 7)[1]]
    c = [r.path for r in patient_split(records, 0.15, 8)[1]]
    assert a == b
    assert set(a) != set(c)


def test_real_dedupe(real_records):
    records = list(real_records)
    kept, dropped = dedupe(records)
    assert dropped == len(records) - len({r.sha1 for r in records})
    assert dropped > 0
    assert len({r.sha1 for r in kept}) == len(kept)
    # the first file of each group is the one kept, and order is preserved
    first = {}
    for r in records:
        first.setdefault(r.sha1, r.path)
    assert [r.path for r in kept] == [first[r.sha1] for r in kept]
    assert [r.path for r in kept] == [r.path for r in records if first[r.sha1] == r.path]


def _rec(name: str, label: int, sha: str, patient: str | None = None) -> Record:
    return Record(Path(f"/data/{CLASS_NAMES[label]}/{name}"), label, patient or patient_id(name), sha)


def test_dedupe_drops_copies_and_every_copy_with_conflicting_labels():
    records = [
        _rec("a.jpeg", 0, "h1"), _rec("b.jpeg", 0, "h1"), _rec("c.jpeg", 0, "h1"),
        _rec("d.jpeg", 1, "h2"), _rec("e.jpeg", 0, "h2"),  # same bytes, different labels
        _rec("f.jpeg", 1, "h3"),
    ]
    kept, dropped = dedupe(records)
    assert [r.path.name for r in kept] == ["a.jpeg", "f.jpeg"]
    assert dropped == 4


def _linked_records() -> list[Record]:
    """Filler patients of both classes plus two PNEUMONIA patients linked by one byte-identical file."""
    records = []
    for i in range(40):
        records.append(_rec(f"IM-{i:04d}-0001.jpeg", 0, f"n{i}"))
        records.append(_rec(f"person{i}_bacteria_1.jpeg", 1, f"p{i}"))
    records += [
        _rec("person900_bacteria_1.jpeg", 1, "x1"),
        _rec("person900_bacteria_2.jpeg", 1, "x2"),
        _rec("person901_virus_1.jpeg", 1, "x3"),
        _rec("person901_virus_2.jpeg", 1, "x1"),  # same bytes as person900_bacteria_1
    ]
    return records


def test_patient_groups_join_patients_linked_by_a_duplicate():
    records = _linked_records()
    groups = patient_groups(records)
    linked = [g for g in groups if any(records[i].patient == "person900" for i in g)]
    assert len(linked) == 1
    assert {records[i].patient for i in linked[0]} == {"person900", "person901"}
    assert sorted(i for g in groups for i in g) == list(range(len(records)))


def test_split_keeps_patients_linked_by_a_duplicate_together():
    records = _linked_records()
    linked = {"person900", "person901"}
    sides_seen = set()
    for seed in range(40):
        train, val = patient_split(records, 0.3, seed)
        _check_split(records, train, val)
        in_val = {r.patient for r in val} & linked
        assert in_val in (set(), linked), f"seed {seed}: linked patients split apart"
        sides_seen.add(bool(in_val))
    assert sides_seen == {True, False}, "the linked group never moved; the test would not catch a split"


def test_split_is_stratified_on_synthetic_records():
    records = [_rec(f"IM-{i:04d}-0001.jpeg", 0, f"n{i}") for i in range(100)]
    records += [_rec(f"person{i}_virus_1.jpeg", 1, f"p{i}") for i in range(300)]
    train, val = patient_split(records, 0.2, 3)
    counts = collections.Counter(r.label for r in val)
    assert counts[0] == 20 and counts[1] == 60


@pytest.mark.parametrize("k", [3, 5])
def test_real_kfold_keeps_patients_and_identical_files_in_one_fold_and_balances_classes(real_records, k):
    records = list(real_records)
    folds = patient_folds(records, k, seed=42)
    assert sorted(set(folds)) == list(range(k))
    for f in range(k):  # every fold against the rest is a valid patient-level split
        _check_split(records, [r for r, g in zip(records, folds) if g != f],
                     [r for r, g in zip(records, folds) if g == f])
    for label, cls in enumerate(CLASS_NAMES):
        per_fold = collections.Counter(g for r, g in zip(records, folds) if r.label == label)
        total = sum(per_fold.values())
        assert max(per_fold.values()) - min(per_fold.values()) <= 0.02 * total, f"{cls}: {per_fold}"
    assert patient_folds(records, k, seed=42) == folds
    assert patient_folds(records, k, seed=7) != folds


def test_kfold_refuses_k_below_two_or_above_the_number_of_patients():
    records = [_rec(f"person{i}_bacteria_1.jpeg", 1, f"h{i}") for i in range(3)]
    with pytest.raises(ValueError, match="k >= 2"):
        patient_folds(records, 1, seed=0)
    with pytest.raises(DataError, match="3 patient group"):
        patient_folds(records, 4, seed=0)


@pytest.mark.parametrize("n_normal, k, fix", [(3, 5, "at most 3"), (1, 2, "add patients")])
def test_kfold_refuses_a_class_with_fewer_patients_than_folds(n_normal, k, fix):
    """Fewer NORMAL patients than folds left some folds without a normal film: the deal went through and the run
    failed only when such a fold came to train (after the others had), with a hint to lower --val_fraction."""
    records = [_rec(f"IM-{i:04d}-0001.jpeg", 0, f"n{i}") for i in range(n_normal)]
    records += [_rec(f"person{i}_virus_1.jpeg", 1, f"p{i}") for i in range(40)]
    with pytest.raises(DataError, match=rf"{n_normal} NORMAL patient group\(s\) cannot give each of {k} folds.*{fix}"):
        patient_folds(records, k, seed=0)
    enough = patient_folds(records, n_normal, seed=0) if n_normal >= 2 else None
    if enough is not None:  # as many folds as normal patients: every fold validates on both classes
        for f in range(n_normal):
            assert {r.label for r, g in zip(records, enough) if g == f} == {0, 1}
