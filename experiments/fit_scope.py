#!/usr/bin/env python
"""Fit the scope classifier for a checkpoint, measure it leave-one-source-out, and store it.

What is fitted (``fit_scope``, a function of the checkpoint and the data folders):
- the out-of-scope gate (``gate.OutOfScopeGate``) refitted on the model's own training split at
  ``--gate_quantile`` of validation (the distance backstop for inputs unlike anything seen);
- the scope classifier (``scope.ScopeClassifier``) on the model's training-split films and full-size
  originals of those patients (in scope) against dev_shift and the generated negatives; its threshold
  is chosen on the validation split (never trained on by the model or the classifier) so that at most
  ``--max_refused`` of those films are refused by the pixel check, the gate and the classifier together.

What is measured (``--json``): for each source of negatives (each dev_shift repository, each generated
corpus), the share refused when the classifier is fitted WITHOUT that source (leave one source out),
and the same numbers in sample; the refusal rate on held-out pediatric films, cross-fitted (threshold
chosen on half of the validation patients, counted on the other half) and on the full-size originals
of validation patients.

    pip download scikit-image==0.26.0 --no-deps -d ~/.cache/pneumoscan/wheels   # sample photos (once)
    python experiments/ood_corpus.py --out /tmp/ood
    python experiments/scope_corpus.py --out /tmp/scope_corpus
    python experiments/fit_scope.py --corpus /tmp/scope_corpus --ood_dir /tmp/ood --json docs/scope/scope_eval.json
    python experiments/fit_scope.py --corpus /tmp/scope_corpus --ood_dir /tmp/ood --write \\
        src/pneumoscan/weights/pneumoscan-v2.pth --model_version pneumoscan-v2.1 --note "..."
                                                  # fit on everything, store in the checkpoint, new version
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from scope_data import (
    Table,
    acquisition_rows,
    augmented_rows,
    dev_shift_table,
    fit_gate,
    gate_fit_rows,
    is_copy,
    load_tables,
    pediatric_tables,
    reference_scores,
    reference_sets,
)

from pneumoscan.checkpoint import default_model_path, load_checkpoint, save_checkpoint
from pneumoscan.cli import configure_logging
from pneumoscan.data import patient_id
from pneumoscan.gate import MIN_SIDE, OutOfScopeGate
from pneumoscan.predict import Predictor
from pneumoscan.results import write_json
from pneumoscan.scope import SCOPE_CLASSES, ScopeClassifier, model_digest, scope_inputs, threshold_refusing
from pneumoscan.scope_report import wilson_interval

log = logging.getLogger("pneumoscan.fit_scope")

# Held out from every fit: never trained on by the model, so they measure false refusals.
HELD_OUT_PEDIATRIC = ("ped_val", "fullres_val")
DEV_SHIFT_SOURCES = {"adult_frontal": 4, "other_body": 4, "lateral": 1}


def rate(mask: np.ndarray) -> dict:
    k, n = int(mask.sum()), int(mask.size)
    return {"refused": k, "n": n, "rate": k / n if n else float("nan"), "ci95": list(wilson_interval(k, n))}


class Pipeline:
    """The three refusal stages of inference, replayed on cached features."""

    def __init__(self, table: Table, gate: OutOfScopeGate) -> None:
        self.table = table
        self.gate = gate
        self.pixel = ((table.min_side < MIN_SIDE) | (table.spread < gate.min_std)
                      | (table.colour > gate.max_colorfulness))  # gate.check_pixels, in its order
        self.distance = (gate.scores(table.block_features()) > gate.threshold).numpy()
        self.before_scope = self.pixel | self.distance
        feats, pixels = table.block_features(), torch.from_numpy(table.pixels)
        self.x = torch.cat([scope_inputs([f[i:i + 256] for f in feats], pixels[i:i + 256])
                            for i in range(0, len(table), 256)])
        self.y = torch.tensor([SCOPE_CLASSES.index(c) for c in table.classes])
        self.sources = np.array(table.sources)
        self.copy = is_copy(table.names)  # augmented copies: fitted on with their source, never counted

    def mask(self, sources) -> np.ndarray:
        return np.isin(self.sources, list(sources))

    def counted(self, source: str) -> np.ndarray:
        """The rows of ``source`` a rate counts: its films, not their augmented copies."""
        return np.flatnonzero((self.sources == source) & ~self.copy)

    def without(self, source: str) -> np.ndarray:
        """Rows a classifier may fit on when ``source`` is left out: its films' copies leave with it."""
        return ~self.mask(HELD_OUT_PEDIATRIC) & (self.sources != source)

    def train(self, rows: np.ndarray, hidden: int, weight_decay: float) -> ScopeClassifier:
        """A classifier fitted on the ``rows`` mask."""
        idx = torch.from_numpy(np.flatnonzero(rows))
        return ScopeClassifier.fit(self.x[idx], self.y[idx], list(SCOPE_CLASSES), hidden=hidden,
                                   weight_decay=weight_decay)

    def calibrate(self, clf: ScopeClassifier, rows: np.ndarray, max_refused: float) -> ScopeClassifier:
        """Set the threshold so that the in-scope ``rows`` (mask) are refused by the pixel check, the gate and
        the classifier together at most ``max_refused`` of the time."""
        rows = np.flatnonzero(rows)
        budget = int(math.floor(max_refused * len(rows))) - int(self.before_scope[rows].sum())
        p_in = clf.probabilities(self.x[rows[~self.before_scope[rows]]])[:, clf.in_index].numpy()
        clf.threshold = threshold_refusing(p_in, budget)
        return clf

    def fullres_held_out(self, hidden: int, weight_decay: float, budgets: tuple[float, ...]) -> dict[float, np.ndarray]:
        """Refusals of the full-size pediatric originals when their patients (every image, 224 px copies too)
        are left out of the fit: two folds by patient; the threshold still comes from the validation films."""
        t = self.table
        patients = np.array([patient_id(Path(n).name) for n in t.names])
        fullres = np.flatnonzero(self.mask(["fullres_train", "fullres_val"]))
        fold_of = {q: i % 2 for i, q in enumerate(sorted(set(patients[fullres])))}
        val_rows = self.mask(["ped_val"]) & (np.array(t.classes) == "in_scope")
        out = {b: np.zeros(len(fullres), bool) for b in budgets}
        for fold in (0, 1):
            left_out = np.isin(patients, [q for q, f in fold_of.items() if f == fold]) & ~self.mask(["ped_val"])
            clf = self.train(~self.mask(HELD_OUT_PEDIATRIC) & ~left_out, hidden, weight_decay)
            in_fold = np.array([fold_of[patients[i]] == fold for i in fullres])
            for b in budgets:
                out[b][in_fold] = self.verdicts(self.calibrate(clf, val_rows, b), fullres[in_fold])[0]
        return out

    def verdicts(self, clf: ScopeClassifier, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(refused by any stage, refused by the classifier, the classifier's category) for ``rows``."""
        probs = clf.probabilities(self.x[rows])
        p_in = probs[:, clf.in_index].numpy()
        scope_refused = p_in < clf.threshold
        probs[:, clf.in_index] = -1
        cats = [clf.classes[int(k)] for k in probs.argmax(1)]
        return self.before_scope[rows] | scope_refused, scope_refused, cats


def _summary(pipe: Pipeline, clf: ScopeClassifier, rows: np.ndarray) -> dict:
    any_stage, scope_only, cats = pipe.verdicts(clf, rows)
    return {**rate(any_stage), "by_classifier_alone": rate(scope_only)["rate"],
            "reasons": dict(Counter(c for c, r, s in zip(cats, any_stage, scope_only) if s))}


def evaluate(pipe: Pipeline, max_refused: float, hidden: int, weight_decay: float) -> dict:
    """Leave-one-source-out refusal rates for every source of negatives, and held-out pediatric rates."""
    t = pipe.table
    classes = np.array(t.classes)
    never = pipe.mask(HELD_OUT_PEDIATRIC)
    ped_val = pipe.mask(["ped_val"]) & (classes == "in_scope")
    out: dict = {"settings": {"max_refused": max_refused, "hidden": hidden, "weight_decay": weight_decay,
                              "gate_quantile": pipe.gate.quantile},
                 "leave_one_source_out": {}, "in_sample": {}}
    negatives = sorted({(c, s) for c, s in zip(t.classes, t.sources) if c != "in_scope"
                        and not s.startswith("ped_")})
    loso_refused: dict[str, np.ndarray] = {}
    for cls, source in negatives:
        rows = pipe.counted(source)
        clf = pipe.calibrate(pipe.train(pipe.without(source), hidden, weight_decay), ped_val, max_refused)
        out["leave_one_source_out"][source] = {"class": cls, **_summary(pipe, clf, rows)}
        loso_refused[cls] = np.concatenate([loso_refused.get(cls, np.zeros(0, bool)), pipe.verdicts(clf, rows)[0]])
        log.info("LOSO %-16s %-60s refused %d/%d", cls, source, *[out["leave_one_source_out"][source][k]
                                                                   for k in ("refused", "n")])
    out["leave_one_source_out_by_class"] = {c: rate(r) for c, r in sorted(loso_refused.items())}
    full = pipe.calibrate(pipe.train(~never, hidden, weight_decay), ped_val, max_refused)
    out["threshold"] = full.threshold
    in_sample: dict[str, np.ndarray] = {}
    for cls, source in negatives:
        rows = pipe.counted(source)
        out["in_sample"][source] = {"class": cls, **_summary(pipe, full, rows)}
        in_sample[cls] = np.concatenate([in_sample.get(cls, np.zeros(0, bool)), pipe.verdicts(full, rows)[0]])
    out["in_sample_by_class"] = {c: rate(r) for c, r in sorted(in_sample.items())}
    for name in ("altered_chest", "other_body"):  # transforms of validation patients' films: never fitted on
        rows = np.flatnonzero(pipe.mask(["ped_val"]) & (classes == name))
        out[f"held_out_transforms_{name}"] = _summary(pipe, full, rows)
    out["pediatric_val_in_sample"] = _summary(pipe, full, np.flatnonzero(ped_val))
    out["pediatric_fullres_val"] = _summary(pipe, full, np.flatnonzero(pipe.sources == "fullres_val"))
    out["pediatric_fullres_patients_left_out"] = rate(pipe.fullres_held_out(hidden, weight_decay,
                                                                             (max_refused,))[max_refused])
    # cross-fitted: threshold from half of the validation patients, refusals counted on the other half
    val_rows = np.flatnonzero(ped_val)
    halves = _halves(np.array([patient_id(Path(n).name) for n in np.array(t.names)[val_rows]]))
    refused = np.zeros(len(val_rows), bool)
    for h in (0, 1):
        thr_mask = np.zeros(len(t), bool)
        thr_mask[val_rows[halves == h]] = True
        clf = pipe.calibrate(full, thr_mask, max_refused)
        refused[halves != h] = pipe.verdicts(clf, val_rows[halves != h])[0]
    pipe.calibrate(full, ped_val, max_refused)
    out["pediatric_val_cross_fitted"] = rate(refused)
    return out


def _halves(patients: np.ndarray) -> np.ndarray:
    """Patients (not images) split in two at random (seed 0)."""
    unique = sorted(set(patients))
    side = dict(zip(unique, np.random.default_rng(0).permutation(len(unique)) % 2))
    return np.array([side[p] for p in patients])


def backend_check(ckpt: dict, gate: dict, scope: dict, backend: str, data_root: Path, dev_shift: Path) -> dict:
    """Refusal rates of the fitted gate and classifier when the features come from another backend (``onnx-int8``
    is what ``backend="auto"`` picks on a CPU): validation films, full-size originals, dev_shift by class."""
    from pneumoscan.backends import make_predictor  # needs the onnx extra: only when asked for

    predictor = make_predictor(ckpt, "cpu", backend)
    predictor.backend_name = backend
    _, ped_val, fullres = pediatric_tables(predictor, ckpt, data_root)
    table = Table.concat([ped_val, fullres, dev_shift_table(predictor, dev_shift)])
    pipe = Pipeline(table, OutOfScopeGate.from_dict(gate))
    clf = ScopeClassifier.from_dict(scope)
    classes = np.array(table.classes)
    out = {"backend": backend}
    for name, rows in (("pediatric_val", pipe.mask(["ped_val"])), ("pediatric_fullres", pipe.mask(["fullres_train",
                                                                                                   "fullres_val"])),
                       *((c, classes == c) for c in ("adult_frontal", "other_body", "lateral"))):
        out[name] = _summary(pipe, clf, np.flatnonzero(rows))
    log.info("%s features: %s", backend, {k: f"{v['refused']}/{v['n']}" for k, v in out.items() if k != "backend"})
    return out


def fit_scope(ckpt: dict, data_root: Path, dev_shift: Path, corpus: Path | None, ood: Path | None,
              max_refused: float = 0.006, gate_quantile: float = 0.999, hidden: int = 0,
              weight_decay: float = 1e-4, evaluate_too: bool = False, gate_copies: int = 0,
              scope_copies: int = 0, negative_copies: int = 0) -> tuple[dict, dict, dict]:
    """The refitted gate and the scope classifier (both as checkpoint dicts) for ``ckpt``, and a report.

    ``gate_copies`` > 0 fits the distance gate's class means and covariances also on that many
    acquisition-augmented copies of the training films (its scales and limit stay on the plain
    validation films; docs/experiments.md, "A gate that knows acquisition changes"). ``scope_copies`` > 0
    fits the scope classifier also on that many augmented copies of the training films as in-scope rows
    (the gate never sees them; docs/experiments.md, "A scope classifier that has seen processed valid films").
    ``negative_copies`` > 0 fits it also on that many augmented copies of dev_shift's films, in their own class
    and source (counted nowhere; docs/experiments.md, "A scope classifier that has seen processed adult films")."""
    predictor = Predictor.from_checkpoint(ckpt, "cpu")
    tables = load_tables(predictor, ckpt, data_root, dev_shift, corpus, ood)
    table = Table.concat(list(tables.values()))
    gate = fit_gate(table, gate_quantile, predictor, gate_copies)
    # what calibrate --refit_gate reports a raised limit giving up
    gate.reference = reference_scores(gate, reference_sets(tables["dev_shift"], tables.get("ood")))
    if scope_copies:
        table = Table.concat([table, acquisition_rows(predictor, table, scope_copies)])
    if negative_copies:  # each copy in its film's class and source: leaving a source out leaves its copies out
        table = Table.concat([table, augmented_rows(predictor, tables["dev_shift"], negative_copies)])
    _, val_rows = gate_fit_rows(table)
    pipe = Pipeline(table, gate)
    report = evaluate(pipe, max_refused, hidden, weight_decay) if evaluate_too else {}
    never = pipe.mask(HELD_OUT_PEDIATRIC)
    clf = pipe.calibrate(pipe.train(~never, hidden, weight_decay), val_rows, max_refused)
    clf.model_digest = model_digest(ckpt["model_state"])
    counts = Counter(table.classes[i] for i in np.flatnonzero(~never))
    clf.info = {"fitted_on": {k: int(v) for k, v in sorted(counts.items())}, "max_refused": max_refused,
                "hidden": hidden, "weight_decay": weight_decay, "fit_script": "experiments/fit_scope.py",
                **({"acquisition_copies_in_scope": scope_copies} if scope_copies else {}),
                **({"acquisition_copies_of_dev_shift": negative_copies} if negative_copies else {})}
    log.info("gate limit %.3f (%.1f%% quantile); scope threshold P(in scope) >= %.4f", gate.threshold,
             100 * gate_quantile, clf.threshold)
    return gate.to_dict(), clf.to_dict(), report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=None, help="checkpoint (default: the shipped model)")
    p.add_argument("--data_root", default="../shared/data", help="holds chest_xray/ and fullres_sample/")
    p.add_argument("--dev_shift", default="../shared/data/dev_shift")
    p.add_argument("--corpus", default=None, help="experiments/scope_corpus.py output")
    p.add_argument("--ood_dir", default=None, help="experiments/ood_corpus.py output")
    p.add_argument("--max_refused", type=float, default=0.006, help="refusal budget on validation films")
    p.add_argument("--gate_quantile", type=float, default=0.999)
    p.add_argument("--gate_copies", type=int, default=0,
                   help="also fit the distance gate on this many acquisition-augmented copies of the training films")
    p.add_argument("--scope_copies", type=int, default=0,
                   help="also fit the scope classifier on this many acquisition-augmented copies of the training "
                        "films (as in-scope rows)")
    p.add_argument("--negative_copies", type=int, default=0,
                   help="also fit the scope classifier on this many acquisition-augmented copies of each dev_shift "
                        "film (in its own class and source)")
    p.add_argument("--hidden", type=int, default=0, help="hidden units (0: multinomial logistic regression)")
    p.add_argument("--weight_decay", type=float, default=1e-4)
    p.add_argument("--json", help="measure leave-one-source-out and write the report here")
    p.add_argument("--skip_loso", action="store_true", help="with --json: skip the leave-one-source-out fits")
    p.add_argument("--check_backend", help="also measure the fitted checks on this backend's features (onnx-int8)")
    p.add_argument("--write", help="store the refitted gate and the classifier in this checkpoint")
    p.add_argument("--model_version", help="with --write: the version the stored checkpoint reports from now on")
    p.add_argument("--note", help="with --model_version: appended to the checkpoint's training_note")
    args = p.parse_args(argv)
    if (args.model_version or args.note) and not args.write:
        p.error("--model_version and --note only apply with --write")
    if args.note and not args.model_version:
        p.error("--note needs --model_version: a changed checkpoint gets a new version")
    if args.write and not args.model_version and Path(args.write).resolve() == default_model_path().resolve():
        p.error("--write on the shipped model changes its checks: give it a new --model_version")
    configure_logging()
    model_path = args.model_path or str(default_model_path())
    ckpt = load_checkpoint(model_path)
    t0 = time.time()
    gate, scope, report = fit_scope(ckpt, Path(args.data_root), Path(args.dev_shift),
                                    Path(args.corpus) if args.corpus else None,
                                    Path(args.ood_dir) if args.ood_dir else None, args.max_refused,
                                    args.gate_quantile, args.hidden, args.weight_decay,
                                    evaluate_too=bool(args.json) and not args.skip_loso, gate_copies=args.gate_copies,
                                    scope_copies=args.scope_copies, negative_copies=args.negative_copies)
    if args.check_backend:
        report["backend_check"] = backend_check(ckpt, gate, scope, args.check_backend, Path(args.data_root),
                                                Path(args.dev_shift))
    if args.json:
        command = " ".join(["python experiments/fit_scope.py", *(sys.argv[1:] if argv is None else argv)])
        report.update(model_path=model_path, command=command, seconds=time.time() - t0, gate_copies=args.gate_copies,
                      scope_copies=args.scope_copies, negative_copies=args.negative_copies,
                      gate_limit=gate["threshold"])
        write_json(report, args.json)
        log.info("report written to %s", args.json)
    if args.write:
        target = load_checkpoint(args.write)
        if model_digest(target["model_state"]) != scope["model_digest"]:
            raise SystemExit(f"{args.write} holds other weights than {model_path}; refusing to store")
        target.update(ood_gate=gate, scope_classifier=scope)
        if args.model_version:
            previous = target.get("model_version", "")
            target["model_version"] = args.model_version
            change = f"{args.model_version} (from {previous}): {args.note or 'gate and scope classifier refitted'}"
            target["training_note"] = "; ".join(filter(None, (target.get("training_note"), change)))
        else:
            log.warning("%s keeps its model version %s with new checks: give --model_version so that predictions "
                        "and the audit log can tell the two apart", args.write, target.get("model_version"))
        save_checkpoint(target, args.write)
        log.info("gate and scope classifier stored in %s (model version %s)", args.write, target.get("model_version"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
