"""Ensemble checkpoints: several trained MedicalCNNs (k-fold folds or fine-tunes) stored and run as one model.

An ensemble checkpoint is an ordinary pneumoscan checkpoint whose ``arch`` is ``ensemble`` and
whose ``model_kwargs`` hold every member's kwargs and input normalisation (``model.Ensemble``).
Everything that runs a model (``Predictor``, Grad-CAM, the gate, the scope check, ONNX export)
works on it unchanged. Its temperature, threshold and gate must come from patients no member trained on:
``write_ensemble`` fits them on the usual validation patients, which k-fold runs with ``cv_holdout`` kept out
and plain runs on the usual split (fine-tunes of one model included) only picked their epoch on.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import torch

from .calibration import temperature_text
from .checkpoint import (
    check_output_path,
    input_spec,
    load_checkpoint,
    model_from_checkpoint,
    model_payload,
    save_checkpoint,
)
from .data import ImageSet, check_validated_on, split_from_config
from .errors import CheckpointError, DataError, PneumoscanError
from .model import Ensemble
from .predict import CLASS_NAMES, InputSpec, Predictor
from .scope import model_digest

log = logging.getLogger(__name__)


def build_ensemble(members: list[dict]) -> tuple[Ensemble, InputSpec]:
    """The ensemble module of loaded member checkpoints and its input contract.

    Raises:
        CheckpointError: no members, members that expect different inputs (size, channels,
            preprocessing) and so cannot share one, or a member whose outputs are other classes, or in
            another order, than ``CLASS_NAMES`` (averaged, its NORMAL logit would count as PNEUMONIA).
    """
    if not members:
        raise CheckpointError("an ensemble needs at least one member checkpoint")
    for i, m in enumerate(members):
        names = list(m.get("class_names", CLASS_NAMES))
        if names != list(CLASS_NAMES):
            raise CheckpointError(f"ensemble member {i} outputs the classes {names}, the ensemble "
                                  f"{list(CLASS_NAMES)}: its logits cannot be averaged with the others'; combine "
                                  f"only models trained by pneumoscan train")
    specs = [input_spec(m) for m in members]
    shape = {(s.image_size, s.in_channels, s.preprocess, s.intensity) for s in specs}
    if len(shape) > 1:
        raise CheckpointError(f"ensemble members expect different inputs (size, channels, preprocessing, "
                              f"intensity): "
                              f"{sorted(shape)}; combine only models trained alike")
    if any(m.get("arch") == "ensemble" for m in members):
        raise CheckpointError("an ensemble member is itself an ensemble; list its members instead")
    model = Ensemble([m["model_kwargs"] for m in members], [[s.mean, s.std] for s in specs])
    for net, m in zip(model.members, members):
        net.load_state_dict(model_from_checkpoint(m).state_dict())
    # the members' own normalisation runs inside the ensemble; every other field is theirs
    return model.eval(), dataclasses.replace(specs[0], mean=0.0, std=1.0)


def ensemble_payload(members: list[dict], *, temperature: float | None, threshold: float, config: dict | None = None,
                     metrics: dict | None = None, model_version: str = "", ood_gate: dict | None = None,
                     half: bool = False) -> dict:
    """The checkpoint dict of an ensemble; ``half`` stores floating weights as float16 (half the file;
    they are widened to float32 on load)."""
    model, spec = build_ensemble(members)
    payload = model_payload(model, arch="ensemble", model_kw=model.model_kwargs, spec=spec,
                            config=config or {"members": [m.get("config", {}) for m in members]},
                            temperature=temperature, threshold=threshold, metrics=metrics,
                            model_version=model_version, ood_gate=ood_gate)
    if half:
        payload["model_state"] = {k: v.half() if v.is_floating_point() else v
                                  for k, v in payload["model_state"].items()}
        payload["weights_dtype"] = "float16"
    return payload


def _split_key(c: dict) -> tuple:
    """The usual split a run's validation patients come from (the seed fixes which patients they are)."""
    return c.get("seed"), c.get("val_fraction"), c.get("min_val_images", 100), c.get("patients_csv_sha256") or ""


def _calibration_split(configs: list[dict]) -> tuple:
    """The one validation split that no member trained on, as (seed, val_fraction, min_val_images, patients).

    A member qualifies if it was a k-fold run with the usual validation patients held out
    (``cv_holdout``) or a plain run on the usual split (no k-fold: it trained on the other patients
    and only picked its epoch on these), and its configuration records that split. A fine-tune
    (``init_from``) also needs the weights it started from to qualify on the same split; where its
    checkpoint predates that record (``init_split``), a warning says it could not be checked.

    Raises:
        CheckpointError: a member (or the weights it was fine-tuned from) trained on the validation
            patients, a member does not record its split, or the members' validation splits differ.
    """
    keys, unchecked = set(), []
    for i, member in enumerate(configs):
        c, chain = member, f"ensemble member {i}"
        while True:
            if "seed" not in c or "val_fraction" not in c:
                raise CheckpointError(f"{chain}: its config does not record which patients it was validated on "
                                      f"(seed and val_fraction missing): retrain it with pneumoscan train")
            if c.get("cv_folds") and not c.get("cv_holdout"):
                raise CheckpointError(
                    f"{chain} was trained on the usual validation patients (a k-fold run without --holdout): no "
                    f"patients are left to calibrate the ensemble on; use k-fold runs with experiments/kfold.py "
                    f"--holdout (pneumoscan train --cv_folds K --cv_holdout) or plain pneumoscan train runs")
            keys.add(_split_key(c))
            if not c.get("init_from"):
                break
            if not c.get("init_split"):
                unchecked.append(f"{chain} (fine-tuned from {c['init_from']})")
                break
            c, chain = c["init_split"], f"{chain}'s starting weights ({c['init_from']})"
    if len(keys) > 1:
        raise CheckpointError(f"ensemble members (or the weights they were fine-tuned from) come from different "
                              f"splits (seed, val_fraction, min_val_images, patients; the seed fixes the "
                              f"validation patients): {sorted(keys, key=str)}")
    for what in unchecked:
        log.warning("%s: the split of the weights it started from is not recorded in its checkpoint (trained "
                    "before pneumoscan stored it), so whether they saw the calibration patients cannot be "
                    "checked; the ensemble's temperature and threshold are optimistic if they did", what)
    return keys.pop()


def _check_distinct(members: list[dict]) -> None:
    """Refuse members with identical weights (``scope.model_digest``): the same checkpoint given twice, or a
    copy of one, is one model that would cost two and be counted twice."""
    seen: dict[str, int] = {}
    for i, m in enumerate(members):
        digest = model_digest(m["model_state"])
        if digest in seen:
            raise CheckpointError(f"ensemble members {seen[digest]} and {i} have identical weights (the same model "
                                  f"given twice, or a copy of it): list each model once")
        seen[digest] = i


def _check_members_validated_on(configs: list[dict], usual_val: ImageSet, data_dir: str, image_size: int,
                                cache_dir: str) -> None:
    """Refuse members validated on other patients than their own validation split of ``data_dir`` holds: the
    usual one (``usual_val``) for a plain run, its fold for a k-fold run (whose held-out patients, the usual
    validation ones, calibrate the ensemble). Either way ``data_dir`` is then not the folder they trained on
    and the ensemble could be calibrated on films a member trained on. Runs from before the record (2026-12-03)
    are not checked.

    Raises:
        CheckpointError: a member's recorded validation patients differ.
    """
    for i, c in enumerate(configs):
        if not c.get("val_patients_sha256"):
            continue
        k_fold = bool(c.get("cv_folds"))
        val = split_from_config(c, data_dir, image_size, cache_dir).val if k_fold else usual_val
        what = f"ensemble member {i}" + (f" (fold {c.get('cv_fold')})" if k_fold else "")
        check_validated_on(c, val, what, data_dir, "give the data folder the members were trained on")


def held_out_cross_validated(logits: torch.Tensor, val: ImageSet, target_sensitivity: float,
                             folds: int = 5) -> dict:
    """What the ensemble's operating point does on held-out patients it was not fitted on: temperature and
    threshold fitted, as ``finalize`` fits them (no temperature on films the ensemble separates), on 4 of
    ``folds`` patient groups of the held-out films and counted on the fifth, pooled. The stored threshold is
    fitted on all of them, so its own sensitivity and specificity there are in-sample (optimistic)."""
    from .cv import OutOfFold, cross_fitted, deal_patients, operating_point

    patients = list(val.patients)
    oof = OutOfFold(logits, val.labels, patients, deal_patients(patients, folds, val.labels.numpy()))
    prob, pred, _ = cross_fitted(oof, target_sensitivity, if_separable=(None, 0.0))
    return {**operating_point(val.labels.numpy(), prob, pred), "folds": folds}


def write_ensemble(members: list[dict], path: str | Path, *, data_dir: str, report: dict | None = None,
                   cache_dir: str = "", half: bool = True, exclusive: bool = False) -> dict:
    """Calibrate the ensemble of ``members`` on the patients none of them trained on and write it.

    The members come from k-fold runs with ``cv_holdout`` (experiments/kfold.py --holdout) or from
    plain runs on the same usual split (``pneumoscan train`` without k-fold, e.g. fine-tunes of one
    model): the usual patient-level validation split of ``data_dir`` fits the temperature, the
    screening threshold and the out-of-scope gate exactly as ``pneumoscan train`` does for one model
    (``train.finalize``). Returns finalize's results (validation metrics with CIs, in-sample for the threshold)
    and ``held_out_cross_validated`` (the operating point on held-out patients it was not fitted on). With ``exclusive``
    an existing file at ``path`` is never replaced (``FileExistsError``).

    Raises:
        CheckpointError: see ``_calibration_split``; two members have identical weights; or a member was
            validated on other patients than its validation split of ``data_dir`` holds (the usual one for a
            plain run, its fold for a k-fold run).
    """
    from .config import TrainConfig
    from .train import finalize

    configs = [m.get("config", {}) for m in members]
    _calibration_split(configs)
    _check_distinct(members)
    model, spec = build_ensemble(members)
    if half:  # calibrate the weights that are stored: float16, widened again on load
        with torch.no_grad():
            for t in model.state_dict().values():
                if t.is_floating_point():
                    t.copy_(t.half().float())
    first = configs[0]
    # "its own split" for later tools (recalibration, scope fitting, evaluation) and for its calibration here: the
    # usual split, whose validation part is the patients no member trained on
    own = {**first, "cv_folds": 0, "cv_fold": 0, "cv_holdout": False}
    splits = split_from_config(own, data_dir, spec.image_size, cache_dir)
    _check_members_validated_on(configs, splits.val, data_dir, spec.image_size, cache_dir)
    targets = [c.get("target_sensitivity", 0.95) for c in configs]
    if len(set(targets)) > 1:
        log.warning("the members were fitted for different target sensitivities (%s): the ensemble's threshold is "
                    "fitted for member 0's, %s", ", ".join(map(str, targets)), targets[0])
    cfg = TrainConfig(target_sensitivity=targets[0])
    predictor = Predictor(model, spec)
    final = finalize(predictor, splits, cfg)
    if final["gate_note"]:
        log.warning("%s", final["gate_note"])
    final["held_out_cross_validated"] = held_out_cross_validated(predictor.logits(splits.val.images), splits.val,
                                                                 cfg.target_sensitivity)
    payload = ensemble_payload(members, temperature=final["temperature"], threshold=final["threshold"],
                               metrics=final["metrics_summary"],
                               model_version=f"ensemble-{len(members)}x-{Path(path).stem}",
                               ood_gate=final["ood_gate"], half=half)
    payload["config"] = {**own, "ensemble_of": {"members": len(members), "cv_folds": first.get("cv_folds"),
                                                "folds": [c.get("cv_fold") if c.get("cv_holdout") else None
                                                          for c in configs]}}
    if report is not None:
        payload["cross_validation"] = report
    save_checkpoint(payload, path, exclusive=exclusive)
    log.info("ensemble of %d members written to %s (temperature %s, threshold %.4f, fitted on %d held-out films)",
             len(members), path, temperature_text(final["temperature"]), final["threshold"], len(splits.val))
    return final


def _ensemble_parser() -> argparse.ArgumentParser:
    from .cli import user_path

    p = argparse.ArgumentParser(
        prog="pneumoscan ensemble",
        description="Combine trained models into one ensemble checkpoint (their logits averaged), with its "
                    "temperature, operating threshold and out-of-scope gate fitted on the validation patients of "
                    "the split the members were trained on. Members: plain pneumoscan train runs on that split "
                    "(fine-tunes included) or k-fold runs with --cv_holdout; none may have trained on those "
                    "patients. Prediction costs one model per member.")
    p.add_argument("--members", type=user_path, nargs="+", required=True, metavar="CHECKPOINT",
                   help="the models to combine")
    p.add_argument("--data_dir", type=user_path, required=True, help="the data folder the members were trained on")
    p.add_argument("--output_path", type=user_path, required=True, help="the ensemble checkpoint to write (a new file)")
    p.add_argument("--fp32", action="store_true", help="store float32 weights (default float16: half the file)")
    p.add_argument("--cache_dir", type=user_path, default="", help="decoded-image cache ('none' disables)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def ensemble_main(argv: list[str] | None = None) -> int:
    """``pneumoscan ensemble``: 0 written, 2 bad usage or input (the log says what to change)."""
    from .cli import EXIT_BAD_INPUT, EXIT_OK, configure_logging

    args = _ensemble_parser().parse_args(argv)
    configure_logging(verbose=args.verbose)
    try:
        out = check_output_path(args.members, args.output_path, role="combined")
        if not Path(args.data_dir).is_dir():
            raise DataError(f"--data_dir {args.data_dir} is not a folder; give the data folder the members were "
                            f"trained on")
        members = [load_checkpoint(m, "--members") for m in args.members]
        final = write_ensemble(members, out, data_dir=args.data_dir, cache_dir=args.cache_dir, half=not args.fp32,
                               exclusive=True)
    except FileExistsError:
        log.error("%s was created by something else meanwhile; it is left as it was and nothing was written: run "
                  "again with a new --output_path", args.output_path)
        return EXIT_BAD_INPUT
    except (PneumoscanError, ValueError) as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    except OSError as exc:
        log.error("could not write the ensemble %s (%s); nothing was written", args.output_path, exc)
        return EXIT_BAD_INPUT
    m, cv = final["metrics_summary"], final["held_out_cross_validated"]
    sys.stdout.write(
        f"wrote {args.output_path}: {len(members)} members; temperature {temperature_text(final['temperature'])}, "
        f"threshold "
        f"{final['threshold']:.4f} ({final['threshold_rule']}) on the validation split; there AUROC "
        f"{m['val_auroc']:.4f}, "
        f"sensitivity {m['val_sensitivity']:.4f}, specificity {m['val_specificity']:.4f} (in-sample: the same "
        f"films fitted the threshold); cross-validated over {cv['folds']} groups of those patients (each counted "
        f"at the point fitted on the others), what to expect on new patients: sensitivity {cv['sensitivity']:.4f}, "
        f"specificity {cv['specificity']:.4f}. It has a feature-distance gate but no scope classifier (adult, lateral, "
        f"other-body checks): experiments/fit_scope.py --write adds one. Use it with --model_path.\n")
    return EXIT_OK
