"""Inputs for fitting and measuring the scope classifier, with their features cached on disk.

Every input is passed through exactly what inference does (``decode_image`` at the model's size,
the stretch to the model input, ``Predictor.outputs``); the pooled block features, the model-input
pixels, the pixel-gate statistics and the logits are cached per set under
``~/.cache/pneumoscan/scope/<model digest>/`` (never in the repository), keyed by the model's
weights and the set's file list, so a second run costs seconds.

Rows carry a class (``pneumoscan.scope.SCOPE_CLASSES``) and a source: the shipped model's own
patient-level split (``ped_train``: trained on; ``ped_val``: never trained on), ``fullres_train`` /
``fullres_val`` (full-size originals of those patients), dev_shift's repositories (manifest.csv),
and the generated corpora (``experiments/scope_corpus.py``, ``experiments/ood_corpus.py``).
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pneumoscan import augment as augment_module
from pneumoscan.augment import augment_batch
from pneumoscan.checkpoint import save_checkpoint
from pneumoscan.data import patient_id, split_from_config
from pneumoscan.gate import OutOfScopeGate
from pneumoscan.inference import list_inputs
from pneumoscan.predict import Predictor
from pneumoscan.preprocess import decode_image, oriented_size
from pneumoscan.scope import model_digest

log = logging.getLogger("pneumoscan.scope_data")

DEV_SHIFT_CLASSES = {"adult_frontal": "adult_frontal", "other_radiographs": "other_body", "lateral_chest": "lateral"}


@dataclass
class Table:
    """Cached outputs for a list of inputs (row i of every array is input i)."""

    names: list[str]
    classes: list[str]
    sources: list[str]
    feats: list[np.ndarray]  # per block (N, C_i) float32
    pixels: np.ndarray  # (N, S, S) uint8 model inputs
    colour: np.ndarray  # colourfulness of the source (pixel gate)
    spread: np.ndarray  # pixel standard deviation at original geometry (pixel gate)
    aspect: np.ndarray  # width / height of the original
    logits: np.ndarray  # (N, 2)
    min_side: np.ndarray  # shorter side of the file as shown (pixel gate's size floor, gate.MIN_SIDE)

    def __len__(self) -> int:
        return len(self.names)

    def select(self, mask: np.ndarray) -> Table:
        idx = np.flatnonzero(mask)
        return Table([self.names[i] for i in idx], [self.classes[i] for i in idx], [self.sources[i] for i in idx],
                     [f[idx] for f in self.feats], self.pixels[idx], self.colour[idx], self.spread[idx],
                     self.aspect[idx], self.logits[idx], self.min_side[idx])

    @staticmethod
    def concat(tables: list[Table]) -> Table:
        return Table(sum((t.names for t in tables), []), sum((t.classes for t in tables), []),
                     sum((t.sources for t in tables), []),
                     [np.concatenate([t.feats[i] for t in tables]) for i in range(len(tables[0].feats))],
                     np.concatenate([t.pixels for t in tables]), np.concatenate([t.colour for t in tables]),
                     np.concatenate([t.spread for t in tables]), np.concatenate([t.aspect for t in tables]),
                     np.concatenate([t.logits for t in tables]), np.concatenate([t.min_side for t in tables]))

    def block_features(self) -> list[torch.Tensor]:
        return [torch.from_numpy(f) for f in self.feats]


def cache_root(predictor: Predictor) -> Path:
    """Per model weights, and per backend for the ONNX ones (their features differ slightly from torch's)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    backend = getattr(predictor, "backend_name", "")
    digest = model_digest(predictor.model.state_dict())
    return base / "pneumoscan" / "scope" / (f"{digest}-{backend}" if backend else digest)


def _run(predictor: Predictor, pixels: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    out = predictor.outputs(torch.from_numpy(pixels), batch_size=64)
    return [f.numpy().astype(np.float32) for f in out.features], out.logits.numpy()


def _cached(predictor: Predictor, name: str, key_items: list[str], make, inputs: int | None = None) -> dict:
    """``make()``'s arrays, kept under a digest of ``key_items``; ``inputs``: how many it makes (for the log)."""
    key = hashlib.sha1("\n".join(key_items).encode()).hexdigest()[:12]
    path = cache_root(predictor) / f"{name}-{key}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    log.info("extracting features for %s (%d inputs); cached at %s", name,
             len(key_items) if inputs is None else inputs, path)
    arrays = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return arrays


def stored_min_sides(files: list[str | Path]) -> np.ndarray:
    """The shorter side of each file as shown (``DecodedImage.size``): from the header where PIL reads it, else
    (DICOM) from a full decode."""
    sides = []
    for f in files:
        try:
            with Image.open(f) as img:
                sides.append(min(oriented_size(img)))
        except (OSError, ValueError):
            sides.append(min(decode_image(f).size))
    return np.array(sides, dtype=np.int64)


def _table(arrays: dict, names: list[str], classes: list[str], sources: list[str]) -> Table:
    feats = [arrays[f"f{i}"] for i in range(sum(k.startswith("f") and k[1:].isdigit() for k in arrays))]
    # feature caches written before the size floor lack the column: read it from the files' headers
    min_side = arrays["min_side"] if "min_side" in arrays else stored_min_sides(names)
    return Table(names, classes, sources, feats, arrays["pixels"], arrays["colour"], arrays["spread"],
                 arrays["aspect"], arrays["logits"], min_side)


def decoded_arrays(files: list[Path], spec) -> dict[str, np.ndarray]:
    """What inference decodes from each file: the model-input pixels (N, S, S) uint8 for ``spec``
    (``checkpoint.input_spec``), the pixel gate's colourfulness and spread, and the original's aspect."""
    if not files:
        raise ValueError("no image files to decode (an empty folder or file list)")
    pixels, colour, spread, aspect, min_side = [], [], [], [], []
    for f in files:
        d = decode_image(f, spec.image_size)
        pixels.append(spec.pixels(d.gray))
        colour.append(d.colorfulness)
        spread.append(float(np.asarray(d.gray).std()))
        aspect.append(d.gray.width / d.gray.height)
        min_side.append(min(d.size))
    return {"pixels": np.stack(pixels), "colour": np.array(colour), "spread": np.array(spread),
            "aspect": np.array(aspect), "min_side": np.array(min_side, dtype=np.int64)}


def store_gate_entries(ckpt: dict, path: str | Path, **entries) -> None:
    """Add ``entries`` to ``ckpt``'s stored gate and write the checkpoint to ``path``; the gate's statistics,
    limit and verdicts stay as they are (``OutOfScopeGate.from_dict`` reads the new entries)."""
    ckpt["ood_gate"] = {**ckpt["ood_gate"], **entries}
    save_checkpoint(ckpt, path)
    log.info("stored %s in the gate of %s", ", ".join(sorted(entries)), path)


def files_table(predictor: Predictor, name: str, files: list[Path], classes: list[str],
                sources: list[str]) -> Table:
    """Features of image files, decoded as inference decodes them."""

    def make() -> dict:
        arrays = decoded_arrays(files, predictor.spec)
        feats, logits = _run(predictor, arrays["pixels"])
        return {**arrays, "logits": logits, **{f"f{i}": f for i, f in enumerate(feats)}}

    arrays = _cached(predictor, name, [f"{f}|{f.stat().st_size}" for f in files], make)
    return _table(arrays, [str(f) for f in files], classes, sources)


def pediatric_tables(predictor: Predictor, ckpt: dict, data_root: Path) -> tuple[Table, Table, Table]:
    """(ped_train, ped_val, fullres): the shipped model's own split at 224 px, and the full-size originals."""
    sp = split_from_config(ckpt["config"], str(data_root / "chest_xray"), predictor.spec.image_size)
    out = []
    for name, s in (("ped_train", sp.train), ("ped_val", sp.val)):
        def make(s=s) -> dict:
            px = s.images.numpy()
            feats, logits = _run(predictor, px)
            spread = px.reshape(len(px), -1).std(1)
            return {"pixels": px, "colour": np.zeros(len(px)), "spread": spread, "aspect": np.ones(len(px)),
                    "logits": logits, **{f"f{i}": f for i, f in enumerate(feats)}}

        arrays = _cached(predictor, name, s.paths, make)
        out.append(_table(arrays, list(s.paths), ["in_scope"] * len(s), [name] * len(s)))
    val_patients = set(sp.val.patients)
    files = sorted((data_root / "fullres_sample").glob("*/*.jpeg"))
    sources = ["fullres_val" if patient_id(f.name) in val_patients else "fullres_train" for f in files]
    out.append(files_table(predictor, "fullres", files, ["in_scope"] * len(files), sources))
    return out[0], out[1], out[2]


def dev_shift_table(predictor: Predictor, dev_shift: Path) -> Table:
    """dev_shift's 413 films; class from the folder, source from manifest.csv's repository column."""
    with open(dev_shift / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # files resized for the set were saved as .jpg under the manifest's stem
    by_stem = {(f.parent.name, f.stem): f for f in list_inputs(dev_shift)}
    files = [by_stem[(r["subfolder"], Path(r["file"]).stem)] for r in rows]
    return files_table(predictor, "dev_shift", files, [DEV_SHIFT_CLASSES[r["subfolder"]] for r in rows],
                       [r["repo"] for r in rows])


def corpus_table(predictor: Predictor, corpus: Path) -> Table:
    """experiments/scope_corpus.py output: CLASS/SOURCE/file."""
    files = list_inputs(corpus)
    rel = [f.relative_to(corpus).parts for f in files]
    return files_table(predictor, "scope_corpus", files, [r[0] for r in rel], [r[1] for r in rel])


def ood_table(predictor: Predictor, ood: Path) -> Table:
    """experiments/ood_corpus.py output: non-radiographs, one source ``ood_corpus``."""
    files = list_inputs(ood)
    return files_table(predictor, "ood_corpus", files, ["non_radiograph"] * len(files), ["ood_corpus"] * len(files))


# The out-of-scope sets a gate stores the distance scores of (``OutOfScopeGate.reference``), so that
# ``pneumoscan calibrate --refit_gate`` can say what a raised limit gives up on them: dev_shift's classes
# and the generated non-radiographs, none of which the distance gate is fitted on.
REFERENCE_NAMES = {"adult_frontal": "dev_shift adult frontal films", "lateral": "dev_shift lateral chest films",
                   "other_body": "dev_shift other-body radiographs", "non_radiograph": "generated non-radiographs"}


def reference_sets(dev: Table, ood: Table | None) -> dict[str, list[torch.Tensor]]:
    """Block features of each reference set, by its ``REFERENCE_NAMES`` name."""
    classes = np.array(dev.classes)
    sets = {REFERENCE_NAMES[c]: dev.select(classes == c).block_features() for c in sorted(set(classes))}
    if ood is not None:
        sets[REFERENCE_NAMES["non_radiograph"]] = ood.block_features()
    return sets


def reference_scores(gate: OutOfScopeGate, sets: dict[str, list[torch.Tensor]]) -> dict[str, list[float]]:
    """The gate's distance score of every input of each set (what the gate stores as its ``reference``)."""
    return {name: [float(v) for v in gate.scores(feats)] for name, feats in sets.items()}


def load_tables(predictor: Predictor, ckpt: dict, data_root: Path, dev_shift: Path, corpus: Path | None,
                ood: Path | None) -> dict[str, Table]:
    """Every input the fit and the measurements use, by origin: ``pediatric`` (training, validation and full-size
    films), ``dev_shift``, and ``corpus`` and ``ood`` where given."""
    tables = {"pediatric": Table.concat(list(pediatric_tables(predictor, ckpt, data_root))),
              "dev_shift": dev_shift_table(predictor, dev_shift)}
    if corpus is not None:
        tables["corpus"] = corpus_table(predictor, corpus)
    if ood is not None:
        tables["ood"] = ood_table(predictor, ood)
    return tables


def load_all(predictor: Predictor, ckpt: dict, data_root: Path, dev_shift: Path, corpus: Path | None,
             ood: Path | None) -> Table:
    """Every input the fit and the measurements use, in one table."""
    return Table.concat(list(load_tables(predictor, ckpt, data_root, dev_shift, corpus, ood).values()))


def gate_fit_rows(table: Table) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, validation rows) the distance gate is fitted on: the model's own training and
    validation films, in scope only. The scope corpus files its transforms of those patients' films
    (rotations, crops of a shoulder, ...) under the same ``ped_train`` / ``ped_val`` sources, so the
    source alone is not enough: before 2026-12-02 the gate's training rows took those transforms in as
    NORMAL films (docs/experiments.md, "A gate that knows acquisition changes")."""
    sources, classes = np.array(table.sources), np.array(table.classes)
    in_scope = classes == "in_scope"
    return (sources == "ped_train") & in_scope, (sources == "ped_val") & in_scope


def pneumonia_labels(table: Table) -> torch.Tensor:
    """1 for a film filed under PNEUMONIA/, 0 otherwise: the gate's classes for in-scope training films."""
    return torch.tensor([int("/PNEUMONIA/" in n) for n in table.names])


def augmented_features(predictor: Predictor, table: Table, copies: int,
                       images: list[torch.Tensor] | None = None, level: str = "acquisition") -> list[torch.Tensor]:
    """Block features of ``copies`` ``level``-augmented copies of ``table``'s model inputs (copy k drawn
    with seed k), copy after copy; cached like the tables, under a key that holds the level and the
    augmentation code itself, so a change to ``pneumoscan/augment.py`` makes new copies. ``images``: those
    copies, when already made."""
    if copies < 1:
        raise ValueError(f"copies must be at least 1, got {copies}")

    def make() -> dict:
        made = images if images is not None else augmented_copies(torch.from_numpy(table.pixels), copies, level)
        aug = [predictor.outputs(c, batch_size=64).features for c in made]
        return {f"f{b}": torch.cat([a[b] for a in aug]).numpy().astype(np.float32) for b in range(len(aug[0]))}

    made_as = (f"images={hashlib.sha1(b''.join(c.numpy().tobytes() for c in images)).hexdigest()[:12]}"
               if images is not None else f"level={level}")  # given copies: whatever made them
    key = [*table.names, f"copies={copies}", made_as, f"augment={augment_digest()}"]
    arrays = _cached(predictor, f"{level}_x{copies}", key, make, copies * len(table.names))
    return [torch.from_numpy(arrays[f"f{b}"]) for b in range(len(arrays))]


def acquisition_rows(predictor: Predictor, table: Table, copies: int) -> Table:
    """In-scope rows for ``copies`` acquisition-augmented copies of the model's in-scope training films
    (source ``ped_train_acq``; a copy's name is its film's with ``#acqK``, so it keeps the film's patient)."""
    return augmented_rows(predictor, table.select(gate_fit_rows(table)[0]), copies, "in_scope", "ped_train_acq")


def is_copy(names: list[str]) -> np.ndarray:
    """Which rows are augmented copies (``augmented_rows`` names them ``...#acqK``): fitted on, never counted."""
    return np.array([re.search(r"#acq\d+$", n) is not None for n in names], bool)


def augmented_rows(predictor: Predictor, rows: Table, copies: int, cls: str | None = None,
                   source: str | None = None) -> Table:
    """``copies`` acquisition-augmented copies of every row of ``rows`` (copy k with seed k; a copy's name is
    its film's with ``#acqK``), with class and source ``cls`` / ``source`` or, when None, the film's own.
    Grey inputs: colourfulness 0, spread and aspect of the copy's model input; no logits."""
    images = augmented_copies(torch.from_numpy(rows.pixels), copies)
    feats = [f.numpy() for f in augmented_features(predictor, rows, copies, images)]
    pixels = torch.cat(images).numpy()
    n = len(pixels)
    names = [f"{name}#acq{k}" for k in range(copies) for name in rows.names]
    classes = [cls] * n if cls is not None else list(rows.classes) * copies
    sources = [source] * n if source is not None else list(rows.sources) * copies
    return Table(names, classes, sources, feats, pixels, np.zeros(n),
                 pixels.reshape(n, -1).std(1).astype(np.float64), np.tile(rows.aspect, copies), np.zeros((n, 2)),
                 np.tile(rows.min_side, copies))


def fit_gate(table: Table, quantile: float, predictor: Predictor | None = None, copies: int = 0) -> OutOfScopeGate:
    """The distance gate fitted on ``gate_fit_rows``: class-conditional on the training films (with ``copies``
    > 0, also on that many acquisition-augmented copies of them, which needs ``predictor``), scales and limit
    at ``quantile`` of the plain validation films."""
    train_rows, val_rows = gate_fit_rows(table)
    train = table.select(train_rows)
    feats, labels = train.block_features(), pneumonia_labels(train)
    if copies:
        if predictor is None:
            raise ValueError("augmented copies need the predictor that makes their features")
        aug = augmented_features(predictor, train, copies)
        feats, labels = [torch.cat([f, a]) for f, a in zip(feats, aug)], labels.repeat(copies + 1)
    gate = OutOfScopeGate.fit(feats, labels, table.select(val_rows).block_features(), quantile=quantile)
    gate.fit_detail(train.pixels)  # the plain training films' fine detail (never the augmented copies)
    return gate


def augment_digest() -> str:
    """Digest of the augmentation code (``pneumoscan/augment.py`` and ``augmented_copies``, which seeds and
    batches it): cached augmented features are only reused while it is unchanged."""
    code = Path(augment_module.__file__).read_bytes() + inspect.getsource(augmented_copies).encode()
    return hashlib.sha1(code).hexdigest()[:12]


def augmented_copies(images: torch.Tensor, copies: int, level: str = "acquisition",
                     batch: int = 256) -> list[torch.Tensor]:
    """``copies`` augmented uint8 copies of (N, S, S) uint8 ``images``, copy k drawn with seed k."""
    out = []
    for k in range(copies):
        gen = torch.Generator().manual_seed(k)
        parts = []
        for i in range(0, len(images), batch):
            x = augment_batch(images[i:i + batch].float().div_(255.0).unsqueeze(1), level, gen)
            parts.append(x.squeeze(1).mul_(255.0).round_().clamp_(0, 255).to(torch.uint8))
        out.append(torch.cat(parts))
    return out
