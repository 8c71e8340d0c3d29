"""``pneumoscan calibrate``: refit a model's temperature and operating threshold on a site's own films.

A stored operating point is fitted on one hospital's validation films. On another site's films the
ranking may hold while the threshold does not (docs/experiments.md: histogram-equalised copies of
the validation films keep AUROC 0.998 but lose 11 points of sensitivity at the stored threshold).
Given labelled local films, this module

- measures the stored operating point on them (sensitivity, specificity, ECE, patient-level CIs);
- estimates what a refitted one will do on *new* films of that site: temperature and threshold fitted
  on 4 of 5 patient groups and counted on the fifth (``cv.cross_fitted``), the honest number;
- refits both on all the films and writes a new checkpoint: same weights, same scope checks, the
  new temperature and threshold, a ``model_version`` naming the site, and a ``site_calibration``
  record (films, patients, date, the previous values, both measurements; an earlier site's record
  kept whole under ``previous.site_calibration``).

The new threshold is the highest meeting the target sensitivity, unless the stored decision boundary
does at least as well on both classes of the site's films and better on one: then that is kept
(``_unless_stored_beats_it``), in each cross-validation fold as on all the films.

The weights are not touched, so AUROC cannot change; only what a probability and the call mean.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
from datetime import datetime, timezone

import numpy as np

from .calibration import fit_calibrated_point, positive_probability, separable
from .checkpoint import format_version
from .cv import OutOfFold, cross_fitted, deal_patients, operating_point
from .data import ImageSet
from .errors import DataError
from .metrics import expected_calibration_error, metrics_with_ci
from .predict import Predictor

log = logging.getLogger(__name__)

_SITE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclasses.dataclass(frozen=True)
class SiteCalibrationConfig:
    """What ``pneumoscan calibrate`` needs besides the films."""

    site: str = "site"
    target_sensitivity: float | None = None  # None: the checkpoint's own (its training target)
    folds: int = 5
    min_per_class: int = 50
    n_boot: int = 1000
    refit_gate: bool = False  # also raise the feature-distance limit to the site films' own quantile
    intercept: bool = False  # logistic calibration (temperature and intercept) instead of a temperature alone
    min_patients_intercept: int = 300  # fewer: too steep a curve on the next patients (experiments/site_intercept.py)

    def __post_init__(self) -> None:
        if not _SITE.match(self.site):
            raise ValueError(f"--site {self.site!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
                             f"letter or digit (it becomes part of the model version)")
        if self.target_sensitivity is not None and not 0.5 <= self.target_sensitivity < 1.0:
            raise ValueError(f"--target_sensitivity {self.target_sensitivity}: give a value in [0.5, 1)")
        if self.folds < 2:
            raise ValueError(f"--folds {self.folds}: the estimate on new films needs at least 2 patient groups")
        if self.min_per_class < 1:
            raise ValueError(f"--min_per_class {self.min_per_class}: give at least 1")


def stored_target(ckpt: dict) -> float:
    """The sensitivity a checkpoint's threshold was fitted for: its site calibration's, else its training's."""
    site = ckpt.get("site_calibration") or {}
    return float(site.get("target_sensitivity") or (ckpt.get("config") or {}).get("target_sensitivity", 0.95))


def check_enough(data: ImageSet, cfg: SiteCalibrationConfig) -> None:
    """Raises DataError when a class or the patients are too few to fit and cross-check an operating point."""
    counts = data.class_counts()
    short = {k: v for k, v in counts.items() if v < cfg.min_per_class}
    if short:
        raise DataError(
            f"calibrating needs at least {cfg.min_per_class} films of each class (a threshold for a target "
            f"sensitivity rests on the pneumonia films, the specificity on the normal ones); found "
            + ", ".join(f"{v} {k}" for k, v in counts.items())
            + ". Add labelled films, or lower --min_per_class knowing the new threshold will be unstable")
    patients = len(set(data.patients))
    if patients < cfg.folds:
        raise DataError(f"the films come from {patients} patient(s); cross-checking over {cfg.folds} patient "
                        f"groups needs at least {cfg.folds}")
    if cfg.intercept and patients < cfg.min_patients_intercept:
        raise DataError(f"--intercept needs films of at least {cfg.min_patients_intercept} patients, here {patients}: "
                        f"fitted on fewer, the curve is so steep that on the site's next patients its errors come "
                        f"with risk LOW far more often than a temperature's (docs/experiments.md, 'An intercept for "
                        f"a site'); calibrate without --intercept, or add films")


def _at(y: np.ndarray, prob: np.ndarray, threshold: float, patients: list[str], n_boot: int) -> dict:
    """Metrics with patient-level CIs at ``threshold``, and the 15-bin ECE."""
    report = metrics_with_ci(y, prob, threshold, n_boot=n_boot, groups=patients)
    return {"threshold": float(threshold), "metrics": report["metrics"], "ece_15": expected_calibration_error(y, prob)}


def _group_point(y: np.ndarray, prob: np.ndarray, pred: np.ndarray, member: np.ndarray, group: int,
                 temperature: float, threshold: float, bias: float = 0.0) -> dict:
    """One patient group's films at the operating point fitted on the other groups, with its class counts;
    a group without pneumonia films has no sensitivity (None), one without normal films no specificity."""
    point = {"fold": int(group), "temperature": temperature, "threshold": threshold, "bias": bias,
             "pneumonia": int((y[member] == 1).sum()), "normal": int((y[member] == 0).sum()),
             **operating_point(y[member], prob[member], pred[member])}
    for metric, films in (("sensitivity", "pneumonia"), ("specificity", "normal")):
        if not point[films]:
            point[metric] = None
    return point


def _counts(y: np.ndarray, called: np.ndarray) -> dict:
    """Pneumonia films called PNEUMONIA and normal films called NORMAL, of how many."""
    pos, neg = y == 1, y == 0
    return {"pneumonia_caught": int((called & pos).sum()), "pneumonia": int(pos.sum()),
            "normal_cleared": int((~called & neg).sum()), "normal": int(neg.sum())}


def _stored_boundary(stored_point: tuple, temperature: float, bias: float) -> float:
    """The stored threshold as a threshold on P = sigmoid(z / temperature + bias): the same margin z, so the
    same calls. ``stored_point`` is (temperature or None, bias, threshold)."""
    old_t, old_b, old_thr = stored_point
    if (float(old_t or 1.0), float(old_b)) == (float(temperature), float(bias)):
        return float(old_thr)  # the calibration kept: the very number, not a round trip through the logit
    margin = (np.log(old_thr / (1.0 - old_thr)) - old_b) * (old_t or 1.0)
    return float(1.0 / (1.0 + np.exp(-(margin / temperature + bias))))


def _unless_stored_beats_it(y: np.ndarray, logits, temperature: float, bias: float, threshold: float,
                            stored_point: tuple) -> tuple[float, bool]:
    """``threshold`` (fitted on these films for the target), or the stored decision boundary where that one does
    at least as well on both classes of these films and better on one; and whether it was kept.

    The highest threshold meeting the target is the best specificity at that sensitivity, but when the stored
    point already has that specificity it only gives up pneumonias the stored point catches (a site whose films
    all lie on the right side of the margin, with room above it). The stored point was not fitted on these
    films, so its counts on them are an honest measure; a refit that cannot beat it on the films it was fitted
    to is no improvement, and keeping the stored boundary there meets the target too (it catches as many)."""
    prob = positive_probability(logits, temperature, bias)
    candidate = _stored_boundary(stored_point, temperature, bias)
    new, old = _counts(y, prob >= threshold), _counts(y, prob >= candidate)
    gains = [old[k] - new[k] for k in ("pneumonia_caught", "normal_cleared")]
    if min(gains) >= 0 and max(gains) > 0:
        return candidate, True
    return threshold, False


def calibrate_on_site(ckpt: dict, predictor: Predictor, data: ImageSet,
                      cfg: SiteCalibrationConfig) -> tuple[dict, dict]:
    """The site-calibrated checkpoint (a deep copy of ``ckpt``) and the report of what changed.

    Raises:
        DataError: too few films of a class, or too few patients (``check_enough``).
    """
    check_enough(data, cfg)
    if cfg.refit_gate and not ckpt.get("ood_gate"):
        raise DataError("--refit_gate: this checkpoint has no feature-distance gate to refit")
    target = cfg.target_sensitivity if cfg.target_sensitivity is not None else stored_target(ckpt)
    outputs = predictor.outputs(data.images, features=cfg.refit_gate)
    in_scope = _scope_passed(ckpt, outputs.features, data.images) if cfg.refit_gate else None
    logits = outputs.logits
    labels = data.labels
    y = labels.numpy()
    patients = list(data.patients)
    old_t, old_thr, old_b = ckpt.get("temperature"), float(ckpt.get("threshold", 0.5)), predictor.bias
    stored = _at(y, positive_probability(logits, old_t, old_b), old_thr, patients, cfg.n_boot)
    oof = OutOfFold(logits, labels, patients, deal_patients(patients, cfg.folds, y))  # stratified by class
    # films the model already separates give a temperature no finite optimum: keep the stored calibration
    kept = (float(old_t or 1.0), float(old_b))
    cv_prob, cv_pred, params = cross_fitted(oof, target, intercept=cfg.intercept, if_separable=kept)
    stored_point = (old_t, old_b, old_thr)
    # the rule that sets the written threshold sets each fold's too, so the estimate describes what is written
    folds_keeping_threshold = 0
    for i, (f, t, thr, b) in enumerate(params):
        fit, held = oof.folds != f, oof.folds == f
        thr, kept_here = _unless_stored_beats_it(y[fit], logits[fit], t, b, thr, stored_point)
        folds_keeping_threshold += kept_here
        cv_pred[held] = cv_prob[held] >= thr
        params[i] = (f, t, thr, b)
    new_t, thr_for_target, new_b = fit_calibrated_point(logits, labels, target, cfg.intercept, if_separable=kept)
    new_thr, threshold_kept = _unless_stored_beats_it(y, logits, new_t, new_b, thr_for_target, stored_point)
    calibration_kept = separable(logits, labels, cfg.intercept)
    refit_prob = positive_probability(logits, new_t, new_b)
    refit = _at(y, refit_prob, new_thr, patients, cfg.n_boot)
    record = {
        "site": cfg.site,
        "calibrated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "films": len(y), "patients": len(set(patients)), "class_counts": data.class_counts(),
        "target_sensitivity": target,
        "previous": {"model_version": ckpt.get("model_version", ""), "temperature": old_t, "threshold": old_thr,
                     "bias": old_b, "metrics": dict(ckpt.get("metrics") or {}),
                     # an earlier site's record whole (films, patients, date, target, measurements, and its own
                     # previous): calibrating again must not erase the history of the operating point
                     **({"site_calibration": copy.deepcopy(ckpt["site_calibration"])}
                        if ckpt.get("site_calibration") else {})},
        "calibration": ("threshold only (the stored calibration kept: the model makes no error on these films at "
                        "its decision margin)") if calibration_kept else
                       "temperature and intercept (logistic)" if cfg.intercept else "temperature",
        "calibration_kept": calibration_kept,
        "folds_keeping_calibration": sum(separable(logits[oof.folds != f], labels[oof.folds != f], cfg.intercept)
                                         for f, *_ in params),
        "temperature": new_t, "bias": new_b, "threshold": new_thr,
        "stored_threshold_kept": ({"threshold_for_target": thr_for_target,
                                   "at_threshold_for_target": _counts(y, refit_prob >= thr_for_target),
                                   "at_stored_boundary": _counts(y, refit_prob >= new_thr)}
                                  if threshold_kept else None),
        "folds_keeping_stored_threshold": folds_keeping_threshold,
        "stored_operating_point_on_site": stored,
        "refitted_cross_validated": {**operating_point(y, cv_prob, cv_pred), "folds": cfg.folds,
                                     "per_fold": [_group_point(y, cv_prob, cv_pred, oof.folds == f, f, t, thr, b)
                                                  for f, t, thr, b in params]},
        "refitted_in_sample": refit,
    }
    if cfg.refit_gate:
        gate_dict, record["gate"] = refit_gate_limit(ckpt["ood_gate"], outputs.features, oof.folds, cfg.site,
                                                     in_scope)
    elif (ckpt.get("site_calibration") or {}).get("gate"):  # an earlier site refit stays in the gate: say so
        record["gate"] = {**ckpt["site_calibration"]["gate"], "kept_from": ckpt.get("model_version", "")}
    record["warnings"] = site_warnings(record)
    for w in record["warnings"]:
        log.warning("%s", w)
    out = copy.deepcopy(ckpt)
    base = str(ckpt.get("model_version") or "model")
    cv = record["refitted_cross_validated"]
    # what is shown beside the threshold (the service's model card) must describe *this* threshold
    metrics = {"val_sensitivity": cv["sensitivity"], "val_specificity": cv["specificity"],
               "val_accuracy": cv["accuracy"], "val_auroc": stored["metrics"]["auroc"]["value"]}
    if threshold_kept:
        refitted = ("the stored calibration and threshold kept (no refit does better on these films)"
                    if calibration_kept else
                    f"{record['calibration']} refitted, the stored decision boundary kept")
    else:
        refitted = ("threshold refitted, calibration kept" if calibration_kept
                    else f"{record['calibration']} and threshold refitted")
    note = (f"{ckpt.get('training_note') or base}; then site-calibrated by pneumoscan calibrate on "
            f"{record['films']} labelled films of {record['patients']} patients of site {cfg.site} "
            f"({record['calibrated_at'][:10]}): {refitted}, weights unchanged; "
            f"the metrics are that site's patient-level cross-validated estimate")
    version = f"{base}+{cfg.site}"
    if cfg.refit_gate and record["gate"]["threshold"] != record["gate"]["previous_threshold"]:
        g = record["gate"]
        note += (f"; feature-distance limit {g['previous_threshold']:.3f} -> {g['threshold']:.3f} "
                 f"(the {g['quantile']:.1%} quantile of the site's films)")
        out["ood_gate"] = gate_dict
        version += "+gate"  # another limit answers: the audit log and the drift check must see a new model
    out.update(temperature=new_t, calibration_bias=new_b, threshold=new_thr, model_version=version, metrics=metrics,
               training_note=note, site_calibration=copy.deepcopy(record))  # the caller's additions stay out
    # with an intercept an older pneumoscan, which would predict without it, must refuse the file
    out["format_version"] = max(int(out.get("format_version", 2)), format_version(out))
    return out, record


# A site whose films need a feature-distance limit this many times the stored one is not a processing
# change the gate should learn to accept: it refuses to refit (the films may not be chest radiographs).
MAX_GATE_RAISE = 3.0


def _scope_passed(ckpt: dict, features: list, pixels) -> np.ndarray | None:
    """Which films the checkpoint's scope classifier accepts (None without one): films it refuses (an
    adult or a knee filed among the site's films) must not set the gate's limit."""
    from .scope import ScopeClassifier

    state = ckpt.get("scope_classifier")
    if not state:
        return None
    return np.array([v.in_scope for v in ScopeClassifier.from_dict(state).check(features, pixels)])


def refit_gate_limit(gate_dict: dict, features: list, groups: np.ndarray, site: str = "site",
                     in_scope: np.ndarray | None = None) -> tuple[dict, dict]:
    """The gate with its feature-distance limit raised to the site films' own quantile (never lowered; the
    means, covariances, pixel checks and the scope classifier are unchanged), and what that does: the
    share of the site's films refused before, and after as estimated on new films (limit fitted on the
    other patient groups, counted on each group). Only films the scope classifier accepts (``in_scope``)
    set the limit. The cap is against the limit training set (``base_threshold``), so calibrating a site
    checkpoint again cannot raise it further.

    Raises:
        DataError: the site's quantile is more than ``MAX_GATE_RAISE`` times the training limit.
    """
    from .gate import OutOfScopeGate

    gate = OutOfScopeGate.from_dict(gate_dict)
    scores = gate.scores(features).numpy()
    keep = np.ones(len(scores), bool) if in_scope is None else np.asarray(in_scope, bool)
    if keep.sum() < 50:
        raise DataError(f"--refit_gate: only {int(keep.sum())} of the site's films pass the scope classifier; at "
                        f"least 50 are needed to set a limit")
    old, base = gate.threshold, gate.base_threshold

    def limit(member: np.ndarray) -> float:
        return max(old, float(np.quantile(scores[member & keep], gate.quantile)))

    new = limit(np.ones(len(scores), bool))
    if new > MAX_GATE_RAISE * base:
        raise DataError(f"--refit_gate: the site's films would need a feature-distance limit of {new:.2f}, more than "
                        f"{MAX_GATE_RAISE:g} times the {base:.2f} set in training: they are too unlike the training "
                        f"films for the gate to be loosened (are they all frontal chest radiographs?); calibrate "
                        f"without --refit_gate")
    cv_refused = sum(int((scores[(groups == g) & keep] > limit(groups != g)).sum()) for g in np.unique(groups))
    gate.threshold, gate.fitted_on = new, f"site {site}'s films"
    top = np.sort(scores[keep])[-3:][::-1]
    record = {"previous_threshold": old, "training_threshold": base, "threshold": new, "quantile": gate.quantile,
              "raise_over_training": new / base, "films_setting_it": int(keep.sum()),
              "films_left_out_by_scope": int((~keep).sum()), "highest_scores": [float(t) for t in top],
              "site_refused_before": float((scores[keep] > old).mean()),
              "site_refused_after_cross_validated": cv_refused / int(keep.sum())}
    record["scope_classifier"] = in_scope is not None  # whether anything but the distance stage checks features
    if gate.reference:  # what the distance stage alone gives up, on the out-of-scope sets stored at its fit
        before, after, trained = gate.reference_caught(old), gate.reference_caught(new), gate.reference_caught(base)
        record["distance_stage_alone"] = {
            name: {"n": b["n"], "caught_before": b["above"], "caught_after": after[name]["above"],
                   **({"caught_at_training_limit": trained[name]["above"]} if old != base else {})}
            for name, b in before.items()}
    return gate.to_dict(), record


# below this AUROC on a site's films the ranking itself has failed there: no threshold will mend it
POOR_AUROC = 0.90


def site_warnings(record: dict) -> list[str]:
    """What a user must read before using the site checkpoint: a ranking too poor to calibrate, or a
    refitted point whose estimate misses the target, gives up specificity, or misses pneumonias the stored
    point catches on these films without a gain in specificity."""
    out = []
    auroc = record["stored_operating_point_on_site"]["metrics"]["auroc"]["value"]
    cv = record["refitted_cross_validated"]
    if auroc < POOR_AUROC:
        out.append(f"the model ranks this site's films poorly (AUROC {auroc:.3f} < {POOR_AUROC}): recalibrating "
                   f"cannot fix that; the model is not validated for these films and should not be used on them")
    if cv["specificity"] < 0.5:
        out.append(f"at the refitted threshold the estimated specificity is {cv['specificity']:.3f}: most normal "
                   f"films would be called PNEUMONIA")
    if record.get("calibration_kept"):
        threshold = ("so is the stored threshold (a refit does worse on these films)"
                     if record.get("stored_threshold_kept") else "only the threshold refitted")
        out.append("the model makes no error on these films at its decision margin, so a temperature fitted on them "
                   "has no finite optimum (it would turn every probability into 0 or 1): the stored calibration is "
                   f"kept and {threshold}; films the model gets wrong are what calibration is learnt from, so add "
                   "labelled films (the harder ones too) to refit it")
    elif record.get("folds_keeping_calibration"):
        out.append(f"in {record['folds_keeping_calibration']} of the cross-validation folds the other folds' films "
                   f"were all on the right side of the model's margin, so those folds kept the stored calibration: "
                   f"the estimate rests on few informative films; add labelled films")
    stored = record["stored_operating_point_on_site"]["metrics"]
    if "sensitivity" in stored and "specificity" in stored:
        s_sens, s_spec = stored["sensitivity"]["value"], stored["specificity"]["value"]
        if cv["sensitivity"] < s_sens and cv["specificity"] <= s_spec:
            out.append(f"on new films of this site the refitted point is estimated to miss pneumonias the stored "
                       f"point catches on these films, for no gain in specificity (sensitivity {cv['sensitivity']:.3f} "
                       f"against the stored point's {s_sens:.3f}, specificity {cv['specificity']:.3f} against "
                       f"{s_spec:.3f}): the stored checkpoint does better here; keep using it, or add labelled films")
    if cv["sensitivity"] < record["target_sensitivity"] - 0.05:
        out.append(f"the estimated sensitivity on new films of this site ({cv['sensitivity']:.3f}) is more than 5 "
                   f"points below the target {record['target_sensitivity']:.2f}: add labelled films")
    return out


def _gate_line(g: dict) -> list[str]:
    if "kept_from" in g:
        return [f"feature-distance gate: the limit {g['threshold']:.3f} set by an earlier site calibration "
                f"({g['kept_from']}) is kept"]
    if g["threshold"] == g["previous_threshold"]:
        return [f"feature-distance gate: limit unchanged ({g['threshold']:.3f}): the site's films do not need a "
                f"higher one"]
    return [f"feature-distance gate: limit {g['previous_threshold']:.3f} -> {g['threshold']:.3f} "
            f"({g['raise_over_training']:.2f}x the training limit; set by {g['films_setting_it']} films"
            f"{' the scope classifier accepts' if g.get('scope_classifier', True) else ''}, "
            f"{g['films_left_out_by_scope']} left out; highest scores "
            f"{', '.join(f'{t:.2f}' for t in g['highest_scores'])}); site films refused by it "
            f"{g['site_refused_before']:.1%} -> {g['site_refused_after_cross_validated']:.1%} (on new films, "
            f"cross-validated); the {'scope classifier and ' if g.get('scope_classifier', True) else ''}pixel checks "
            f"are unchanged",
            _caution(g.get("distance_stage_alone"), g.get("scope_classifier", True))]


def _caution(alone: dict | None, scope_classifier: bool = True) -> str:
    head = "CAUTION: a raised limit also lets through more inputs that only the distance stage would catch. "
    if scope_classifier:
        tail = "; the scope classifier, which checks every input as well, is unchanged" + (
            ", but these films are among those it was fitted on, so that it still refuses them says little about "
            "inputs it has not seen" if alone else "")
    else:
        tail = "; this checkpoint has no scope classifier, so what the distance stage lets through gets an answer"
    tail += ": use it where valid films are being refused, not by default"
    if not alone:
        return (head + "How many was not measured for this model: its gate stores no out-of-scope reference scores "
                "(experiments/gate_alone.py --store adds them, from dev_shift and the generated non-radiographs)"
                + tail)
    parts = [f"{v['caught_after']} instead of {v['caught_before']} of the {v['n']} {name}"
             + (f" ({v['caught_at_training_limit']} at the training limit)" if "caught_at_training_limit" in v else "")
             for name, v in alone.items()]
    return (head + "Of the out-of-scope films whose distance scores this gate stores, the distance stage alone now "
            "catches " + ", ".join(parts) + tail)


def _threshold_kept_lines(record: dict) -> list[str]:
    kept, folds = record.get("stored_threshold_kept"), record.get("folds_keeping_stored_threshold", 0)
    lines = []
    if kept:
        at, new = kept["at_stored_boundary"], kept["at_threshold_for_target"]
        lines.append(
            f"threshold: the stored decision boundary is kept ({record['threshold']:.4f} on the written "
            f"probabilities): on these films it catches {at['pneumonia_caught']} of {at['pneumonia']} pneumonia "
            f"films and clears {at['normal_cleared']} of {at['normal']} normal ones, the highest threshold meeting "
            f"the target ({kept['threshold_for_target']:.4f}) {new['pneumonia_caught']} and {new['normal_cleared']}: "
            f"a refit would give up films of one class and gain none of the other")
    if folds:
        lines.append(f"in {folds} of the {record['refitted_cross_validated']['folds']} cross-validation folds the "
                     f"stored boundary was kept the same way")
    return lines


def _history_lines(previous: dict) -> list[str]:
    earlier = previous.get("site_calibration")
    if not earlier:
        return []
    return [f"the checkpoint calibrated here was itself calibrated for site {earlier['site']} "
            f"({earlier['calibrated_at'][:10]}, {earlier['films']} films of {earlier['patients']} patients); that "
            f"record is kept whole under previous.site_calibration"]


def format_site_report(record: dict) -> str:
    """The before/after table ``pneumoscan calibrate`` prints."""
    s, cv = record["stored_operating_point_on_site"], record["refitted_cross_validated"]
    m = s["metrics"]

    def ci(k: str) -> str:
        v = m[k]
        return f"{v['value']:.3f} [{v['ci_low']:.3f}, {v['ci_high']:.3f}]"

    def spread(k: str, films: str) -> str:  # over the groups holding films of the class the metric counts
        values = [f[k] for f in cv["per_fold"] if f.get(films, 1) and f[k] is not None]
        return f"{min(values):.3f}-{max(values):.3f}" if values else "n/a"

    prev = record["previous"]

    def calib(t: float | None, b: float | None) -> str:  # the temperature, and the intercept where there is one
        return "none" if t is None else f"{t:.3f}" + (f", b {b:+.3f}" if b else "")

    prev_t = calib(prev["temperature"], prev.get("bias"))
    lines = [
        f"site {record['site']}: {record['films']} films of {record['patients']} patients "
        f"({', '.join(f'{v} {k}' for k, v in record['class_counts'].items())}); "
        f"target sensitivity {record['target_sensitivity']:.2f}",
        "",
        "| operating point | temperature (, intercept) | threshold | sensitivity | specificity | ECE |",
        "|---|---|---|---|---|---|",
        f"| stored, on these films | {prev_t} | {prev['threshold']:.4f} | {ci('sensitivity')} | "
        f"{ci('specificity')} | {s['ece_15']:.3f} |",
        f"| refitted, on new films of this site (cross-validated over {cv['folds']} patient groups) | "
        f"{calib(record['temperature'], record.get('bias'))} | {record['threshold']:.4f} | "
        f"{cv['sensitivity']:.3f} ({spread('sensitivity', 'pneumonia')}) | "
        f"{cv['specificity']:.3f} ({spread('specificity', 'normal')}) | {cv['ece']:.3f} |",
        "",
        "In brackets for the refitted point: the lowest and highest of the patient groups, a guide to how much it "
        "can move on the next films.",
        *_threshold_kept_lines(record),
        *_history_lines(prev),
        *(_gate_line(record["gate"]) if "gate" in record else []),
        *[f"WARNING: {w}" for w in record.get("warnings", [])],
        "The weights are unchanged, so AUROC is unchanged "
        f"({m['auroc']['value']:.4f} [{m['auroc']['ci_low']:.4f}, {m['auroc']['ci_high']:.4f}] on these films).",
    ]
    return "\n".join(lines)
