"""Patient-level k-fold cross-validation: train every fold, pool the out-of-fold predictions, and
(with held-out patients) write the folds' calibrated ensemble.

``pneumoscan train --cv_folds K`` (without ``--cv_fold``) runs ``run_cv``: K ordinary training
runs in OUTPUT_DIR/foldI (a finished fold is skipped and an interrupted one resumed, so the
command can simply be started again; a finished fold of other data or another recipe is refused, and so is
an OUTPUT_DIR holding a plain run; ``--overwrite`` trains every fold anew), then ``cv_results.json`` and
``cv_summary.txt``:

- out-of-fold (OOF) AUROC with a patient-level bootstrap CI, and the per-fold AUROCs;
- one temperature and one threshold (sensitivity >= ``target_sensitivity``) fitted on all OOF
  logits, and the specificity there (in-sample for the threshold, so optimistic);
- the same operating point cross-validated: for fold I, temperature and threshold fitted on the
  other folds' OOF logits and applied to fold I; pooled sensitivity, specificity, accuracy and ECE.
  This is the honest estimate of what a stored threshold does on new patients;
- with ``--cv_holdout``, OUTPUT_DIR/medical_cnn_model.pth: the K fold models as one ensemble,
  calibrated and gated on the held-out patients (``ensemble.write_ensemble``), with its metrics.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Collection
from pathlib import Path

import numpy as np
import torch

from .atomic import write_text
from .calibration import fit_calibrated_point, fit_operating_point, positive_probability
from .checkpoint import input_spec, load_checkpoint
from .config import TrainConfig
from .data import ImageSet, check_validated_on, split_from_config
from .distributed import env_world, from_main, joined_world
from .errors import CheckpointError
from .metrics import auroc, expected_calibration_error, metrics_with_ci
from .predict import Predictor
from .results import write_json

log = logging.getLogger(__name__)

CV_RESULTS = "cv_results.json"
CV_SUMMARY = "cv_summary.txt"


@dataclasses.dataclass
class OutOfFold:
    """Pooled out-of-fold predictions: each film scored by the one fold model that did not train on it."""

    logits: torch.Tensor
    labels: torch.Tensor
    patients: list[str]
    folds: np.ndarray

    def __post_init__(self) -> None:
        """Refuse a pooling in which one patient is scored in two folds: the cross-fitted operating point would
        then be fitted on films of the patients it is counted on (fold models of different partitions, e.g.
        of another seed or another --cv_folds, pooled together)."""
        n = len(self.labels)
        if not len(self.logits) == len(self.patients) == len(self.folds) == n:
            raise ValueError(f"out-of-fold rows disagree: {len(self.logits)} logits, {n} labels, "
                             f"{len(self.patients)} patients, {len(self.folds)} fold numbers")
        fold_of: dict[str, int] = {}
        shared = {pt for pt, f in zip(self.patients, np.asarray(self.folds).tolist()) if fold_of.setdefault(pt, f) != f}
        if shared:  # not named: a patients CSV's identifiers are never shown
            raise CheckpointError(f"{len(shared)} patient(s) are scored in two folds: the fold models do not come "
                                  f"from one patient-level partition; pool the folds of one k-fold run (the same "
                                  f"--cv_folds, --seed and data)")


def fold_dir(out: Path, fold: int) -> Path:
    return out / f"fold{fold}"


def continued_folds_config(out: Path, cfg: TrainConfig, given: Collection[str]) -> TrainConfig:
    """``--resume`` of a k-fold run: ``cfg`` with the recipe of the run in ``out`` for every flag not in ``given``
    (``TrainConfig.continued``), read from its first fold that finished (``training_results.json``) or started
    (``checkpoint_last.pth``); the fold's own number is never taken.

    Raises:
        CheckpointError: no fold of ``out`` has either file.
    """
    from .train import LAST_FILE

    for fold in range(cfg.cv_folds):
        run_dir = fold_dir(out, fold)
        if (run_dir / "training_results.json").is_file():
            stored = json.loads((run_dir / "training_results.json").read_text())["config"]
        elif (run_dir / LAST_FILE).is_file():
            stored = load_checkpoint(run_dir / LAST_FILE).get("config", {})
        else:
            continue
        log.info("--resume: the k-fold run's recipe is read from %s (the flags not given again)", run_dir)
        return cfg.continued(stored, {*given, "cv_fold"})
    raise CheckpointError(f"--resume: {out} holds no started fold of a {cfg.cv_folds}-fold run (fold0/ ... with "
                          f"training_results.json or {LAST_FILE}); start without --resume")


def train_folds(cfg: TrainConfig, only: list[int] | None = None, root: Path | None = None,
                given: Collection[str] | None = None) -> tuple[list[Path], TrainConfig]:
    """Train every fold of ``cfg.cv_folds`` (or those in ``only``) into ROOT/foldI (ROOT: OUTPUT_DIR);
    returns the folds' model paths and the config asked for (continued, before any fold's width was
    chosen). A finished fold is checked (``_check_finished_fold``) and skipped, an interrupted one resumed;
    with ``cfg.overwrite`` every fold trains anew. With ``cfg.resume`` and ``given`` (the flags given again)
    the flags not given are the run's own (``continued_folds_config``).

    Raises:
        CheckpointError: a finished fold was trained with other settings than ``cfg``; ``--resume`` of a folder
            with no started fold.
    """
    from .predict import resolve_device
    from .train import LAST_FILE, MODEL_FILE, pin_patients_csv, run_training

    out = Path(root or cfg.output_dir)
    # under torchrun one process group serves every fold: a group left and joined again between folds hung the
    # ranks in the next fold's first collective (seen in the test suite); rank 0 decides what each fold needs.
    # It is left after the last fold, before rank 0 alone scores them (the others are done then).
    with joined_world(resolve_device(cfg.device).type) as world:
        if cfg.resume and given is not None:  # rank 0 reads the recipe; every rank trains it
            cfg = from_main(lambda: continued_folds_config(out, cfg, given), world)
        asked = cfg
        folds = list(range(cfg.cv_folds)) if only is None else only
        cfg = pin_patients_csv(cfg)  # as each fold's run pins it: a finished fold is checked on it
        widths = tuple(w for w in (cfg.width, cfg.fallback_width) if w)
        for fold in folds:
            run_dir = fold_dir(out, fold)

            def finished_earlier(run_dir=run_dir, fold=fold) -> dict | None:
                if not (run_dir / "training_results.json").exists() or cfg.overwrite:
                    return None  # with --overwrite every fold trains anew
                trained = json.loads((run_dir / "training_results.json").read_text())["config"]
                _check_finished_fold(trained, dataclasses.replace(cfg, cv_fold=fold), run_dir, widths)
                # the same folder, but films added or removed since: refused now, before the other folds train
                val = split_from_config(trained, cfg.data_dir, trained["image_size"], cfg.cache_dir).val
                check_validated_on(trained, val, f"{run_dir} (fold {fold})", cfg.data_dir, _REUSE_FIX)
                return trained

            trained = from_main(finished_earlier, world)
            if trained is not None:
                log.info("fold %d of %d: finished earlier (%s), skipped", fold, cfg.cv_folds, run_dir)
            else:
                resume = from_main(lambda run_dir=run_dir: (run_dir / LAST_FILE).exists() and not cfg.overwrite,
                                   world)
                log.info("fold %d of %d%s", fold, cfg.cv_folds, " (resumed)" if resume else "")
                trained = run_training(dataclasses.replace(cfg, cv_fold=fold, output_dir=str(run_dir),
                                                           resume=resume))["config"]
            if cfg.fallback_width:  # the first fold's speed check decides the width of every fold
                if trained["width"] != cfg.width:
                    log.info("the other folds train at width %s too, the width fold %d trained at", trained["width"],
                             fold)
                cfg = dataclasses.replace(cfg, width=trained["width"], fallback_width=0.0)
    return [fold_dir(out, f) / MODEL_FILE for f in folds], asked


# What a finished fold must share with this run to be reused: its data, patients, network, input and recipe
# (a fold of a 2-fold run in a 3-fold run's folder would score films twice in the out-of-fold report; a fold
# trained on another data folder may have trained on the films it is now said to score). Only settings that
# cannot change the fold's model are left out: folders, device, threads, cache, target_sensitivity (the OOF
# report and the ensemble fit their own operating points) and width (checked apart: it may be the fallback's).
_FOLD_FIXED = ("data_dir", "cv_folds", "cv_fold", "cv_holdout", "seed", "val_fraction", "min_val_images",
               "patients_csv_sha256", "strict", "arch", "image_size", "in_channels", "dropout", "intensity",
               "epochs", "batch_size", "augment", "mixup", "loss", "focal_gamma", "lr", "weight_decay",
               "lr_schedule", "lr_patience", "lr_factor", "min_lr", "eval_metric", "patience", "max_train_minutes",
               "init_from", "freeze_blocks")


_REUSE_FIX = "give the data folder it was trained on, or train into a new --output_dir (or with --overwrite)"


def _fold_setting(key: str, value):
    """A fold setting as compared: a data folder by the folder it names, not by how it is spelt."""
    return str(Path(value).expanduser().resolve()) if key == "data_dir" and value else value


def _check_finished_fold(trained: dict, cfg: TrainConfig, run_dir: Path, widths: tuple[float, ...]) -> None:
    """Refuse to reuse a finished fold trained with other settings than this run's, or at none of ``widths``
    (--width and --fallback_width: a fold trained by an earlier run may have fallen back where this one's first
    fold did not; the report names such mixed widths)."""
    changed = [f"{k}: {trained[k]!r} (this run: {getattr(cfg, k)!r})" for k in _FOLD_FIXED
               if k in trained and _fold_setting(k, trained[k]) != _fold_setting(k, getattr(cfg, k))]
    if "width" in trained and trained["width"] not in widths:
        changed.append(f"width: {trained['width']!r} (this run: {' or '.join(map(repr, widths))})")
    if changed:
        raise CheckpointError(f"{run_dir} holds a fold trained with other settings ({'; '.join(changed)}); "
                              f"give a new --output_dir, --overwrite to train every fold again, or the settings "
                              f"it was trained with")


def collect_oof(model_paths: list[Path], data_dir: str, cache_dir: str = ""
                ) -> tuple[OutOfFold, list[dict], list[ImageSet]]:
    """Each fold model's raw (uncalibrated) logits on its own validation fold; the loaded checkpoints
    and those validation folds (in the same order).

    Raises:
        CheckpointError: two models of one fold, a fold model validated on other patients than its fold of
            ``data_dir`` holds (``check_validated_on``), or a patient in two folds (``OutOfFold``).
    """
    logits, labels, patients, folds, ckpts, vals = [], [], [], [], [], []
    given: dict[int, Path] = {}
    for i, path in enumerate(model_paths):
        ckpt = load_checkpoint(path)
        fold = ckpt["config"].get("cv_fold", i)
        if fold in given:  # its films would be scored twice, by two models, and counted twice
            raise CheckpointError(f"{path} and {given[fold]} are both fold {fold}: give each fold's model once")
        given[fold] = Path(path)
        ckpts.append(ckpt)
        val = split_from_config(ckpt["config"], data_dir, input_spec(ckpt).image_size, cache_dir).val
        check_validated_on(ckpt["config"], val, f"{path} (fold {ckpt['config'].get('cv_fold', i)})", data_dir,
                           _REUSE_FIX)
        vals.append(val)
        logits.append(Predictor.from_checkpoint(ckpt).logits(val.images))
        labels.append(val.labels)
        patients += list(val.patients)
        folds.append(np.full(len(val), fold))
    return OutOfFold(torch.cat(logits), torch.cat(labels), patients, np.concatenate(folds)), ckpts, vals


def deal_patients(patients: list[str], k: int = 5, labels=None) -> np.ndarray:
    """Each film's group (0..k-1), patients dealt at random (seed 0) so that a patient's films share a
    group: the "folds" over which one model's operating point is cross-validated on films it was not
    trained on (its own validation split, or a site's films for ``pneumoscan calibrate``).

    With ``labels`` (each film's, 1 for PNEUMONIA) the deal is stratified: the patients of each class (their
    films' majority, as ``data.patient_folds`` reads it) are dealt in turn, so every group gets about 1/k of
    each class, and one of each where a class has k patients or more. Dealt together, a class of few patients
    often left a group without one (8 pneumonia patients among 68: a group with none), whose sensitivity is then
    not measured and whose threshold is fitted on the other groups' more. Without ``labels``: the unstratified
    deal of earlier results."""
    rng = np.random.default_rng(0)
    if labels is None:
        ranked = list(rng.permutation(sorted(set(patients))))
    else:
        films: dict[str, list[int]] = {}
        for pt, y in zip(patients, np.asarray(labels).tolist()):
            films.setdefault(pt, [0, 0])[int(y)] += 1
        ranked = [pt for cls in (0, 1)
                  for pt in rng.permutation(sorted(pt for pt, n in films.items() if int(n[1] > n[0]) == cls))]
    order = {pt: i % k for i, pt in enumerate(ranked)}
    return np.array([order[pt] for pt in patients])


def cross_fitted(oof: OutOfFold, target_sensitivity: float = 0.95, applied_to: torch.Tensor | None = None,
                 intercept: bool = False, if_separable: tuple[float, float] | None = None,
                 ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, float, float, float]]]:
    """For each fold: the temperature (with ``intercept``, the logistic calibration) and the threshold fitted on
    the *other* folds' OOF logits, applied to this fold's films. ``applied_to`` (the same films in the same
    order, changed, e.g. re-encoded) replaces the logits they are applied to, so the operating point stays the
    one fitted on the unchanged films. Returns the calibrated P(PNEUMONIA) per film, the call per film, and
    (fold, temperature, threshold, bias). ``if_separable``: as in ``fit_calibrated_point``."""
    y, logits, labels, folds = oof.labels.numpy(), oof.logits, oof.labels, oof.folds
    target = oof.logits if applied_to is None else applied_to
    if len(target) != len(y):
        raise ValueError(f"applied_to has {len(target)} rows for {len(y)} OOF films")
    cv_prob = np.zeros(len(y))
    cv_pred = np.zeros(len(y), dtype=bool)
    params = []
    for f in np.unique(folds):
        held, fit = folds == f, folds != f
        if not fit.any():
            raise ValueError("cross-validating the operating point needs at least two folds")
        t, thr, b = fit_calibrated_point(logits[fit], labels[fit], target_sensitivity, intercept, if_separable)
        cv_prob[held] = positive_probability(target[held], t, b)
        cv_pred[held] = cv_prob[held] >= thr
        params.append((int(f), t, thr, b))
    return cv_prob, cv_pred, params


def operating_point(y: np.ndarray, prob: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Sensitivity, specificity, accuracy of the calls ``pred`` and the 15-bin ECE of ``prob``; a metric with
    nothing to divide by (no pneumonia films: no sensitivity) is NaN, as in ``metrics``, never 0."""
    pos, neg = y == 1, y == 0
    return {"sensitivity": float((pred & pos).sum() / pos.sum()) if pos.any() else float("nan"),
            "specificity": float((~pred & neg).sum() / neg.sum()) if neg.any() else float("nan"),
            "accuracy": float((pred == pos).mean()) if len(y) else float("nan"),
            "ece": expected_calibration_error(y, prob)}


def oof_report(oof: OutOfFold, target_sensitivity: float = 0.95) -> dict:
    """AUROC, OOF operating point and its cross-validated counterpart (see the module docstring)."""
    y, logits, labels, folds = oof.labels.numpy(), oof.logits, oof.labels, oof.folds
    t_all, thr_all = fit_operating_point(logits, labels, target_sensitivity)
    p_all = positive_probability(logits, t_all)
    at_thr = metrics_with_ci(y, p_all, thr_all, groups=oof.patients)
    cv_prob, cv_pred, params = cross_fitted(oof, target_sensitivity)
    per_fold = [{"fold": f, "n": int((folds == f).sum()), "auroc": auroc(y[folds == f], p_all[folds == f]),
                 "temperature": t, "threshold": thr} for f, t, thr, _ in params]
    aurocs = [r["auroc"] for r in per_fold]
    return {
        "n": len(y), "patients": len(set(oof.patients)),
        "normal": int((y == 0).sum()), "pneumonia": int((y == 1).sum()),
        "auroc": at_thr["metrics"]["auroc"],
        "fold_auroc_mean": float(np.mean(aurocs)),
        "fold_auroc_sd": float(np.std(aurocs, ddof=1)) if len(aurocs) > 1 else 0.0,
        "temperature": t_all, "threshold": thr_all, "target_sensitivity": target_sensitivity,
        "at_oof_threshold": {k: at_thr["metrics"][k] for k in ("sensitivity", "specificity", "accuracy")},
        "ece_raw": expected_calibration_error(y, positive_probability(logits)),
        "ece_after_in_sample": expected_calibration_error(y, p_all),
        "cross_validated": operating_point(y, cv_prob, cv_pred),
        "per_fold": per_fold,
    }


def mixed_widths(widths: list[float]) -> str | None:
    """Why the fold models (of these ``widths``) differ in width, when they do (``--fallback_width``, the
    fast preset's speed check, is decided by a run's first fold; folds trained by different runs can differ)."""
    if len(set(widths)) < 2:
        return None
    return (f"the fold models differ in width ({', '.join(f'x{w}' for w in widths)}); their folds were trained "
            f"by different runs (the first fold of a run decides the width of the others); train again into a "
            f"new --output_dir with --width to give every fold the same model")


def summary_text(report: dict) -> str:
    o = report["oof"]
    a, cvd = o["auroc"], o["cross_validated"]
    lines = [
        f"pneumoscan {len(o['per_fold'])}-fold cross-validation by patient",
        f"out-of-fold films: {o['n']} ({o['patients']} patients; NORMAL {o['normal']}, PNEUMONIA {o['pneumonia']})",
        f"AUROC {a['value']:.4f} [{a['ci_low']:.4f}, {a['ci_high']:.4f}] (95 % CI, bootstrap over patients); "
        f"per fold {o['fold_auroc_mean']:.4f} +- {o['fold_auroc_sd']:.4f}",
        f"OOF temperature {o['temperature']:.3f}, threshold {o['threshold']:.4f} for sensitivity >= "
        f"{o['target_sensitivity']}: specificity {o['at_oof_threshold']['specificity']['value']:.4f} "
        f"(threshold chosen on these films)",
        f"cross-validated operating point (fitted on the other folds): sensitivity {cvd['sensitivity']:.4f}, "
        f"specificity {cvd['specificity']:.4f}, accuracy {cvd['accuracy']:.4f}, ECE {cvd['ece']:.4f}",
    ]
    widths = report.get("fold_widths") or []
    if report.get("mixed_widths"):
        lines.append(f"note: {report['mixed_widths']}")
    elif widths and widths[0] != report["config"]["width"]:
        lines.append(f"fold models at width x{widths[0]}, not x{report['config']['width']}: the first fold's speed "
                     f"check found that --epochs at x{report['config']['width']} would not fit --max_train_minutes")
    held = report.get("ensemble_holdout")
    if held:
        m = held["validation"]["at_threshold"]["metrics"]
        lines += [f"ensemble of the fold models on {held['n']} held-out films (no member saw them): AUROC "
                  f"{m['auroc']['value']:.4f} [{m['auroc']['ci_low']:.4f}, {m['auroc']['ci_high']:.4f}]; "
                  f"at its threshold {held['threshold']:.4f}: sensitivity {m['sensitivity']['value']:.4f}, "
                  f"specificity {m['specificity']['value']:.4f} (threshold chosen on these films); ECE "
                  f"{held['ece_after_cross_fitted']:.4f} (temperature fitted on other held-out patients)"]
        hcv = held.get("cross_validated")
        if hcv:
            lines.append(f"the ensemble's operating point cross-validated over {hcv['folds']} groups of the held-out "
                         f"patients (fitted on the others): sensitivity {hcv['sensitivity']:.4f}, specificity "
                         f"{hcv['specificity']:.4f}, accuracy {hcv['accuracy']:.4f}, ECE {hcv['ece']:.4f}")
        lines.append(f"ensemble model: {held['model_path']}")
    return "\n".join(lines) + "\n"


def claim_folder(out: Path, overwrite: bool) -> None:
    """Make ``out`` the folder of this k-fold run. Without ``overwrite`` a plain training run there is refused
    (``train.refuse_existing_run``) and an earlier start of this k-fold run is continued (its finished folds
    are checked and skipped). With it, the files of the run it replaces are removed: a plain run's (so that a
    later start reads the folder as this run's) and the model at its top (so that a run without --cv_holdout
    leaves no ensemble of other folds there)."""
    from .train import MODEL_FILE, PLAIN_RUN_FILES, refuse_existing_run

    if not overwrite:
        refuse_existing_run(out, k_fold=True)
        return
    for name in (*PLAIN_RUN_FILES, MODEL_FILE):
        if (out / name).exists():
            log.info("--overwrite: removing %s, of the run this k-fold run replaces", out / name)
            (out / name).unlink(missing_ok=True)


def run_cv(cfg: TrainConfig, given: Collection[str] | None = None) -> dict:
    """Train all folds, write the out-of-fold report and, with ``cv_holdout``, the ensemble model; with
    ``cfg.resume``, the flags not in ``given`` are the run's own (``train_folds``)."""
    from .ensemble import write_ensemble
    from .train import MODEL_FILE

    out = Path(cfg.output_dir)
    claim_folder(out, cfg.overwrite)
    paths, cfg = train_folds(cfg, given=given)
    if not env_world().is_main:  # under torchrun the folds trained together; rank 0 alone scores and writes
        return {"config": cfg.to_dict(), "folds": [str(p) for p in paths]}
    oof, ckpts, _ = collect_oof(paths, cfg.data_dir, cfg.cache_dir)
    widths = [c["config"]["width"] for c in ckpts]
    report = {"config": cfg.to_dict(), "folds": [str(p) for p in paths],
              "oof": oof_report(oof, cfg.target_sensitivity),
              "fold_widths": widths, "mixed_widths": mixed_widths(widths)}
    if report["mixed_widths"]:
        log.warning("%s", report["mixed_widths"])
    if cfg.cv_holdout:
        final = write_ensemble(ckpts, out / MODEL_FILE, data_dir=cfg.data_dir, report=dict(report),
                               cache_dir=cfg.cache_dir)
        report["ensemble_holdout"] = {
            "model_path": str(out / MODEL_FILE), "n": final["validation"]["at_threshold"]["n"],
            **{k: final[k] for k in ("temperature", "threshold", "ece_before", "ece_after", "ece_after_cross_fitted",
                                     "validation")},
            "cross_validated": final["held_out_cross_validated"]}
    write_json(report, out / CV_RESULTS)
    write_text(out / CV_SUMMARY, summary_text(report))
    log.info("\n%s", summary_text(report))
    return report
