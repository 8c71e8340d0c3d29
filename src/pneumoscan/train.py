"""The training loop: plain functions, one config, checkpoints every epoch.

``run_training(cfg)`` trains, selects the best epoch on the patient-level validation
split by ``cfg.eval_metric``, calibrates (temperature scaling, screening threshold)
on validation, evaluates once on ``test/`` if present, and writes every output.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import time
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .atomic import write_text
from .budget import choose_width, last_epoch_in_budget
from .calibration import cross_fitted_ece, fit_calibrated_point, positive_probability, separable, temperature_text
from .checkpoint import default_model_path, load_checkpoint, model_payload, save_checkpoint, versions
from .config import TrainConfig
from .data import SPLIT_KEYS, DataSplits, ImageSet, file_sha256, patients_digest, prepare_data, split_record
from .distributed import World, all_sum, broadcast, from_main, joined_world, main_first
from .errors import CheckpointError, TrainingError
from .gate import MIN_FIT_FILMS, OutOfScopeGate, small_fit_note
from .losses import build_loss
from .metrics import (
    binary_metrics,
    expected_calibration_error,
    format_metrics_table,
    metrics_with_ci,
    reliability_bins,
)
from .model import SEED_WIDTHS, build_model, model_kwargs
from .plots import plot_history, plot_reliability
from .predict import CLASS_NAMES, InputSpec, Predictor, resolve_device
from .results import write_json
from .scope import ScopeClassifier, features_digest
from .step import sync, train_step, training_batch

log = logging.getLogger(__name__)

MODEL_FILE = "medical_cnn_model.pth"
LAST_FILE = "checkpoint_last.pth"
# Config fields that must not change when resuming a run (flags not given again keep the run's own values,
# TrainConfig.continued). init_from fixes the input normalisation; the restored schedule keeps eval_metric, lr_factor,
# lr_patience and min_lr, the restored optimiser lr and weight_decay; loss, focal_gamma, augment, mixup and
# batch_size would change the recipe halfway (and the validation loss the best epoch was chosen by).
_RESUME_FIXED = ("arch", "width", "image_size", "in_channels", "dropout", "seed", "val_fraction", "cv_folds",
                 "cv_fold", "cv_holdout", "patients_csv_sha256", "lr_schedule", "init_from",
                 "intensity", "freeze_blocks", "eval_metric", "lr_factor", "lr_patience", "min_lr", "lr",
                 "weight_decay", "loss", "focal_gamma", "augment", "mixup", "batch_size", "preset")


def normalization_stats(images: torch.Tensor, intensity: str = "raw") -> dict[str, float]:
    """Mean and std of the training images' model-input grey levels in [0, 1] (``intensity`` applied;
    a sample of at most 512 images)."""
    sample = InputSpec(32, 0.0, 1.0, 1, intensity=intensity).scaled(images[:: max(1, len(images) // 512)])
    return {"mean": float(sample.mean()), "std": float(sample.std())}


@dataclass
class Trainer:
    """The parts of a run that its epochs advance: model, its predictor, optimiser, schedule, losses."""

    cfg: TrainConfig
    predictor: Predictor
    model_kw: dict
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau
    criterion: torch.nn.Module
    eval_criterion: torch.nn.Module
    gen: torch.Generator
    world: World = World()
    train_module: torch.nn.Module | None = None  # the model wrapped in DistributedDataParallel under torchrun

    @property
    def model(self) -> torch.nn.Module:
        return self.predictor.model

    def payload(self, out: Path, epoch: int, **extra) -> dict:
        """The checkpoint dict of the current weights."""
        return model_payload(self.model, arch=self.cfg.arch, model_kw=self.model_kw, spec=self.predictor.spec,
                             config=self.cfg.to_dict(), epoch=epoch, model_version=f"{out.name}-epoch{epoch}",
                             **extra)


@dataclass
class Progress:
    """Where a run stands: restored by ``resume``, advanced by ``fit``."""

    history: list[dict] = field(default_factory=list)
    best_value: float | None = None
    best_epoch: int = 0
    next_epoch: int = 1
    best_state: dict | None = None
    stop_reason: str = "reached --epochs"
    trained_s: float = 0.0  # training time of the invocations before this one (--resume): the budget counts it


@dataclass
class InitialWeights:
    """What ``--init_from`` starts a run with: weights and the input normalisation they expect."""

    state: dict
    norm: dict[str, float]  # as normalization_stats gives it
    split: dict  # the patients those weights were trained on (data.split_record of their config)
    config: dict = field(default_factory=dict)  # the config they were trained with (their data_dir, digest)
    scope_classifier: dict | None = None  # theirs, where it fits their weights (a head-only run carries it over)
    image_size: int = 0  # the input size they were trained at
    ood_gate: dict | None = None  # theirs (a head-only run with too few validation films to refit it keeps it)


def initial_weights(cfg: TrainConfig) -> InitialWeights:
    """Read and check ``cfg.init_from`` (fine-tuning), before any data is prepared.

    Raises:
        CheckpointError: the checkpoint cannot be read, is an ensemble, or describes another network
            than ``--arch``/``--width``/``--in_channels`` build.
    """
    path = default_model_path() if cfg.init_from == "shipped" else Path(cfg.init_from)
    ckpt = load_checkpoint(path, "--init_from (a .pth file, or 'shipped')")
    if "ensemble" in ckpt["model_kwargs"]:  # what model_from_kwargs builds an Ensemble from
        raise CheckpointError(f"--init_from {path}: an ensemble cannot be fine-tuned as one network; "
                              f"pass a single-model checkpoint")

    def shape(kw: dict) -> dict:  # what fixes the parameters' shapes (dropout does not)
        return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in kw.items() if k != "dropout"}

    want, have = shape(model_kwargs(cfg.arch, cfg.in_channels, cfg.width, cfg.dropout)), shape(ckpt["model_kwargs"])
    differ = [f"{k} {have.get(k)!r} (this run: {want.get(k)!r})" for k in sorted(want.keys() | have.keys())
              if want.get(k) != have.get(k)]
    if differ:
        raise CheckpointError(f"--init_from {path} holds another network than this run builds "
                              f"({'; '.join(differ)}); give the --arch, --width and --in_channels it was "
                              f"trained with")
    spec = ckpt["input_spec"]
    trained_with = spec.get("intensity", "raw")
    if trained_with != cfg.intensity:
        raise CheckpointError(f"--init_from {path} was trained with --intensity {trained_with}, "
                              f"this run asks for {cfg.intensity}: its weights expect other grey levels; "
                              f"give --intensity {trained_with}")
    if spec["image_size"] != cfg.image_size:
        log.warning("--init_from %s was trained at %d px; fine-tuning it at %d px", path, spec["image_size"],
                    cfg.image_size)
    log.info("fine-tuning from %s (%s, epoch %s); keeping its input normalisation (mean %.4f, std %.4f)",
             path, ckpt.get("model_version") or "unnamed", ckpt.get("epoch"), spec["mean"], spec["std"])
    scope = ckpt.get("scope_classifier")
    try:
        scope = scope if scope and ScopeClassifier.from_dict(scope).fits(ckpt["model_state"]) else None
    except (ValueError, KeyError, TypeError):  # unusable: the run fits no scope classifier either
        scope = None
    return InitialWeights(ckpt["model_state"], {"mean": float(spec["mean"]), "std": float(spec["std"])},
                          split_record(ckpt.get("config") or {}), dict(ckpt.get("config") or {}), scope,
                          int(spec["image_size"]), ckpt.get("ood_gate"))


def carried_scope_classifier(cfg: TrainConfig, init: InitialWeights | None) -> dict | None:
    """``--init_from``'s scope classifier, for a run whose features stay those it was fitted on: every
    convolutional block frozen and the same input size. Tied to the convolutional weights (``features_digest``),
    since the head it does not read is retrained."""
    if init is None or not init.scope_classifier:
        return None
    if cfg.freeze_blocks < len(SEED_WIDTHS) or cfg.image_size != init.image_size:
        log.info("the scope classifier of --init_from is not kept: %s, so the features it reads change; refit it "
                 "with experiments/fit_scope.py", "some convolutional blocks are trained"
                 if cfg.freeze_blocks < len(SEED_WIDTHS) else "the input size differs")
        return None
    info = {**init.scope_classifier.get("info", {}), "carried_from": str(cfg.init_from)}
    return {**init.scope_classifier, "features_digest": features_digest(init.state), "info": info}


def carried_gate(cfg: TrainConfig, init: InitialWeights | None, n_val: int) -> dict | None:
    """``--init_from``'s out-of-scope gate, for a run whose features stay those it was fitted on (every block frozen,
    the same input size) and whose validation films are too few to refit its limit (``gate.MIN_FIT_FILMS``): a
    limit refitted on 6 films refuses about 1 in 7 valid films. Tied to the convolutional weights in ``finish``."""
    if (init is None or not init.ood_gate or n_val >= MIN_FIT_FILMS or cfg.freeze_blocks < len(SEED_WIDTHS)
            or cfg.image_size != init.image_size):
        return None
    return {"gate": init.ood_gate, "features_digest": features_digest(init.state), "carried_from": str(cfg.init_from)}


def warn_if_validated_on_seen_patients(cfg: TrainConfig, init: InitialWeights) -> bool:
    """Warn when a fine-tune on the data its starting weights trained on validates on other patients than they
    did: most of those were their training patients, so the epoch choice, the temperature, the threshold and
    the validation metrics would be optimistic. Returns whether it warned.

    Known only for the same data folder; the starting weights' validation-patient digest decides where both
    runs have one, else their split settings (a k-fold fine-tune always validates on seen patients)."""
    start = init.config
    if not start.get("data_dir") or Path(start["data_dir"]).expanduser().resolve() != \
            Path(cfg.data_dir).expanduser().resolve():
        return False
    if start.get("val_patients_sha256") and cfg.val_patients_sha256:
        seen = start["val_patients_sha256"] != cfg.val_patients_sha256
    else:
        seen = bool(cfg.cv_folds) or any(start.get(k) != getattr(cfg, k) for k in SPLIT_KEYS if k in start)
    if seen:
        log.warning("--init_from %s was trained on this data folder with another validation split (seed %s, "
                    "val_fraction %s, cv_folds %s): this run's validation patients include patients those weights "
                    "trained on, so its epoch choice, temperature, threshold and validation metrics are "
                    "optimistic; fine-tune with the starting run's --seed and --val_fraction to validate on "
                    "patients they never saw", cfg.init_from, start.get("seed"), start.get("val_fraction"),
                    start.get("cv_folds", 0))
    return seen


def pin_patients_csv(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its patients CSV (if any) as an absolute path and pinned by content: a later --resume, k-fold
    rerun, ensemble or split_from_config checks the file against ``patients_csv_sha256``."""
    if not cfg.patients_csv:
        return cfg
    csv_path = Path(cfg.patients_csv).expanduser().resolve()
    return replace(cfg, patients_csv=str(csv_path), patients_csv_sha256=file_sha256(csv_path))


def frozen_note(freeze_blocks: int) -> str:
    if freeze_blocks == len(SEED_WIDTHS):
        return " (classifier head only)"
    return f" (convolutional blocks 1-{freeze_blocks} frozen)" if freeze_blocks else ""


def build_trainer(cfg: TrainConfig, splits: DataSplits, device: torch.device, world: World = World(),
                  init: InitialWeights | None = None) -> Trainer:
    """Model, input contract (normalised with the training images' statistics), loss, optimiser, schedule.

    With ``init`` (``--init_from``) the model starts from those weights and keeps the normalisation
    they were trained with.

    Under torchrun the model is wrapped in DistributedDataParallel (which copies rank 0's initial
    weights to every rank) for the training passes; validation and checkpoints use the bare model.
    """
    counts = [splits.train.class_counts()[c] for c in CLASS_NAMES]
    model = build_model(cfg)
    if init is not None:
        model.load_state_dict(init.state)
    norm = init.norm if init is not None else normalization_stats(splits.train.images, cfg.intensity)
    spec = InputSpec(cfg.image_size, norm["mean"], norm["std"], cfg.in_channels, intensity=cfg.intensity)
    for block in model.features[:cfg.freeze_blocks]:  # 5: last-layer retraining, every gate's features kept
        block.requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    log.info("model %s: %d parameters, %d of them trained%s", cfg.arch, sum(p.numel() for p in model.parameters()),
             sum(p.numel() for p in trained), frozen_note(cfg.freeze_blocks))
    predictor = Predictor(model, spec, None, device)
    optimizer = torch.optim.Adam(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.lr_schedule == "cosine":  # stepped once per epoch: lr reaches min_lr after --epochs
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs, eta_min=cfg.min_lr)
    else:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=cfg.metric_mode, factor=cfg.lr_factor, patience=cfg.lr_patience, min_lr=cfg.min_lr)
    train_module = model
    if world.distributed:
        train_module = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 7919 * world.rank)  # own augmentation draws
    return Trainer(cfg, predictor, model_kwargs(cfg.arch, cfg.in_channels, cfg.width, cfg.dropout), optimizer,
                   scheduler, build_loss(cfg.loss, counts, cfg.focal_gamma).to(device),
                   build_loss(cfg.loss, counts, cfg.focal_gamma), gen, world, train_module)


def epoch_order(n: int, cfg: TrainConfig, world: World, epoch: int) -> torch.Tensor:
    """This rank's shuffled sample indices for ``epoch``: all of them for one process; under torchrun
    a DistributedSampler share (equal length on every rank, padded by repetition)."""
    if not world.distributed:
        return torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
    sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=world.world_size, rank=world.rank,
                                                  shuffle=True, seed=cfg.seed)
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.long)


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of each training batch over ``n`` shuffled films: a last batch of one joins the one before
    it, since batch normalisation cannot train on one film and dropping it would leave a film out of the epoch."""
    stops = list(range(batch_size, n, batch_size)) + [n]
    if n > 1 and n % batch_size == 1:
        stops.pop(-2)
    return [(a, b) for a, b in zip([0, *stops[:-1]], stops) if b - a > 1]


def train_one_epoch(tr: Trainer, data: ImageSet, epoch: int) -> dict:
    """One pass over ``data`` in shuffled batches; returns loss, accuracy and where the time went."""
    cfg, model, device = tr.cfg, tr.train_module or tr.model, tr.predictor.device
    model.train()
    for block in tr.model.features[:cfg.freeze_blocks]:  # frozen blocks keep their batch-norm statistics too
        block.eval()
    perm = epoch_order(len(data), cfg, tr.world, epoch)
    total_loss, correct, seen = 0.0, 0, 0
    data_time = compute_time = 0.0
    bounds = batch_bounds(len(perm), cfg.batch_size)
    n_batches = len(bounds)
    bar = tqdm(range(n_batches), desc=f"epoch {epoch}", unit="batch", leave=False,
               disable=None if tr.world.is_main else True)
    for b in bar:
        t0 = time.perf_counter()
        idx = perm[slice(*bounds[b])]
        imgs = data.images[idx].to(device, non_blocking=True)
        target = data.labels[idx].to(device, non_blocking=True)
        # mixup's draws depend only on seed, rank, epoch and batch: a resumed run repeats them
        batch = training_batch(imgs, target, tr.predictor.spec, cfg, tr.gen,
                               np.random.default_rng([cfg.seed, tr.world.rank, epoch, b]))
        sync(device)
        t1 = time.perf_counter()
        loss, logits = train_step(model, tr.optimizer, tr.criterion, batch, f"epoch {epoch}, batch {b}")
        total_loss += loss.item() * len(idx)
        correct += int((logits.argmax(1) == target).sum())
        seen += len(idx)
        t2 = time.perf_counter()
        data_time += t1 - t0
        compute_time += t2 - t1
        bar.set_postfix(loss=f"{total_loss / seen:.4f}")
    total_loss, correct, seen = all_sum([total_loss, correct, seen], tr.world)  # over all ranks
    return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1),
            "data_time": data_time, "compute_time": compute_time}


def validate(tr: Trainer, data: ImageSet) -> tuple[dict, torch.Tensor]:
    """Validation loss and metrics at 0.5 (uncalibrated), and the logits."""
    logits = tr.predictor.logits(data.images, batch_size=2 * tr.cfg.batch_size)
    bad = int((~torch.isfinite(logits).all(dim=1)).sum())
    if bad:  # the weights overflowed (the training loss may still look finite): no metric can be read
        raise TrainingError(f"the model's outputs on {bad} of {len(data)} validation films are not finite (NaN or "
                            f"infinity): training diverged; lower --lr (the best epoch so far is in "
                            f"{MODEL_FILE}, and --resume starts from the last one)")
    loss = float(tr.eval_criterion(logits, data.labels))
    m = binary_metrics(data.labels.numpy(), positive_probability(logits), 0.5)
    return {"loss": loss, **m}, logits


def _is_better(value: float, best: float | None, mode: str) -> bool:
    if math.isnan(value):
        return False
    return best is None or (value > best if mode == "max" else value < best)


def _check_resume(state: dict, cfg: TrainConfig, but: tuple[str, ...] = ()) -> None:
    old = state.get("config", {})
    changed = [f"{k}: {old.get(k)!r} -> {getattr(cfg, k)!r}" for k in _RESUME_FIXED
               if k not in but and k in old and old[k] != getattr(cfg, k)]
    if cfg.lr_schedule == "cosine" and "epochs" in old and old["epochs"] != cfg.epochs and "epochs" not in but:
        changed.append(f"epochs: {old['epochs']!r} -> {cfg.epochs!r} (a cosine schedule anneals over --epochs: "
                       f"continued over others it would rise again)")
    if changed:
        raise CheckpointError("cannot --resume with a different " + "; ".join(changed)
                              + " (use the original flags or a new --output_dir)")


PLAIN_RUN_FILES = (LAST_FILE, "training_results.json")  # what marks a folder as holding a plain training run


def refuse_existing_run(out: Path, k_fold: bool = False) -> None:
    """Raises CheckpointError if ``out`` holds a run that can be resumed (``checkpoint_last.pth``) or has finished
    (``training_results.json``), or a k-fold run's report (``cv_results.json``) that a plain run's model would
    replace the folds' ensemble beside. A model file alone (a run killed between the two writes of its first
    epoch) is replaced, with a warning. With ``k_fold`` (the folder of a k-fold run, ``cv.run_cv``) only a plain
    run is refused: the k-fold run's own earlier start is continued (its finished folds are skipped)."""
    from .cv import CV_RESULTS

    existing = [name for name in PLAIN_RUN_FILES if (out / name).exists()]
    if k_fold and existing:
        raise CheckpointError(f"{out} holds a plain training run ({', '.join(existing)}): give a new --output_dir "
                              f"for the k-fold run, or --overwrite to replace it (its {MODEL_FILE} would be "
                              f"replaced by the folds' ensemble with --cv_holdout)")
    if k_fold:
        return
    if existing:
        raise CheckpointError(f"{out} holds a run already ({', '.join(existing)}): continue it with --resume, give a "
                              f"new --output_dir, or --overwrite to replace it (its model would be replaced by "
                              f"this run's first epoch)")
    if (out / CV_RESULTS).exists():
        raise CheckpointError(f"{out} holds a k-fold run ({CV_RESULTS}): give a new --output_dir, or --overwrite to "
                              f"replace it (its folds' ensemble {MODEL_FILE}, where there is one, would be replaced "
                              f"by this run's first epoch)")
    if (out / MODEL_FILE).exists():
        log.warning("%s holds %s but no %s to resume from (a run stopped in its first epoch): starting again",
                    out, MODEL_FILE, LAST_FILE)


def read_last_checkpoint(out: Path, cfg: TrainConfig,
                         given: Collection[str] | None = None) -> tuple[dict, TrainConfig]:
    """``out/checkpoint_last.pth``, the state that ``--resume`` continues from, read before any data is
    prepared, and the config to continue with: ``cfg``, with ``given`` continued from the state's
    (``TrainConfig.continued``), checked against its fixed flags (all but a width equal to
    ``--fallback_width``, which the speed check may still choose; ``resume`` checks it).

    Raises:
        CheckpointError: the file is missing or cannot be read, or was written with other fixed flags.
    """
    last_path = out / LAST_FILE
    if not last_path.exists():
        if (out / "fold0").is_dir():  # cv.fold_dir: a k-fold run's folder
            raise CheckpointError(f"--resume: {out} holds a k-fold run (fold0/ ...): give --cv_folds K with --resume "
                                  f"(K: its number of folds)")
        raise CheckpointError(f"--resume: no {LAST_FILE} in {out}; start without --resume")
    state = load_checkpoint(last_path)
    if given is not None:
        cfg = cfg.continued(state.get("config", {}), given)
    _check_resume(state, cfg, but=("width",) if state.get("config", {}).get("width") == cfg.fallback_width else ())
    return state, cfg


def resume(tr: Trainer, out: Path, state: dict) -> Progress:
    """Restore weights, optimiser, schedule, random state and history from ``state``, the
    ``read_last_checkpoint`` of ``out`` that every rank was given.

    Raises:
        CheckpointError: it was written with other fixed flags.
    """
    _check_resume(state, tr.cfg)
    stored = state.get("config", {}).get("val_patients_sha256")
    if stored and stored != tr.cfg.val_patients_sha256:  # known only now, after data preparation
        raise CheckpointError(f"cannot --resume {out}: its validation patients differ from this run's (the data "
                              f"folder changed or another one was given), so the best epoch so far was chosen on "
                              f"other films; resume on the original data, or start a new --output_dir")
    tr.model.load_state_dict(state["model_state"])
    tr.optimizer.load_state_dict(state["optimizer_state"])
    tr.scheduler.load_state_dict(state["scheduler_state"])
    tr.gen.set_state(state["generator_state"].to(tr.gen.device) if tr.gen.device.type == "cuda"
                     else state["generator_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if not tr.world.is_main:  # only rank 0's generator is saved: the others continue on their own draws
        tr.gen.manual_seed(tr.cfg.seed + 7919 * tr.world.rank + 104729 * state["epoch"])
    progress = Progress(history=state["history"], best_value=state["best_value"], best_epoch=state["best_epoch"],
                        next_epoch=state["epoch"] + 1, trained_s=float(state.get("trained_s") or 0.0))
    stopped, old = state.get("stopped") or "", state.get("config", {})
    # early stopping or the time budget had ended it: finish it, do not train on, unless --patience or
    # --max_train_minutes was raised (0: no budget)
    budget, old_budget = tr.cfg.max_train_minutes, float(old.get("max_train_minutes") or 0)
    budget_raised = budget == 0 or (old_budget > 0 and budget > old_budget)
    if (stopped.startswith("time budget") and not budget_raised) or (
            stopped.startswith("early stopping") and tr.cfg.patience <= int(old.get("patience", tr.cfg.patience))):
        progress.stop_reason, progress.next_epoch = stopped, tr.cfg.epochs + 1
        log.info("--resume: the run had stopped after epoch %d (%s); finishing it without more epochs (a new "
                 "--output_dir trains another)", state["epoch"], state["stopped"])
    log.info("resumed from %s at epoch %d (best %s %.4f at epoch %d)", out / LAST_FILE, progress.next_epoch,
             tr.cfg.eval_metric, progress.best_value if progress.best_value is not None else float("nan"),
             progress.best_epoch)
    return progress


def write_epoch(tr: Trainer, out: Path, epoch: int, val: dict, progress: Progress, improved: bool,
                stopped: str | None = None, trained_s: float = 0.0) -> None:
    """``checkpoint_last.pth`` (for --resume; with ``stopped``, why training ends after this epoch, and
    ``trained_s``, the run's training time so far) and, if ``improved``, ``medical_cnn_model.pth``."""
    payload = tr.payload(out, epoch, metrics={"val": val})  # the weights copied once for both files
    if improved:
        save_checkpoint(payload, out / MODEL_FILE)
    save_checkpoint({**payload,
                     "optimizer_state": tr.optimizer.state_dict(),
                     "scheduler_state": tr.scheduler.state_dict(),
                     "generator_state": tr.gen.get_state().cpu(), "torch_rng_state": torch.get_rng_state(),
                     "history": progress.history, "best_value": progress.best_value,
                     "best_epoch": progress.best_epoch, "stopped": stopped,
                     "trained_s": trained_s}, out / LAST_FILE)


def fit(tr: Trainer, splits: DataSplits, progress: Progress, out: Path) -> Progress:
    """Train from ``progress.next_epoch`` until --epochs, early stopping or the time budget.

    Every epoch writes ``checkpoint_last.pth`` (for --resume) and, when the validation metric
    improves, ``medical_cnn_model.pth``; ``progress`` holds the best weights at the end.
    Under torchrun rank 0 validates, writes and decides when to stop; every rank follows it.
    """
    cfg, world = tr.cfg, tr.world
    started, first = time.time(), progress.next_epoch
    before_min = progress.trained_s / 60  # --max_train_minutes is for the run, over all its invocations
    for epoch in range(first, cfg.epochs + 1):
        t0 = time.time()
        trained = train_one_epoch(tr, splits.train, epoch)
        val = from_main(lambda: validate(tr, splits.val)[0], world)
        value = val[cfg.eval_metric]
        lr = tr.optimizer.param_groups[0]["lr"]
        if isinstance(tr.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            tr.scheduler.step(value)
        else:
            if cfg.max_train_minutes and epoch < cfg.epochs:
                elapsed_min = (time.time() - started) / 60
                last = broadcast(last_epoch_in_budget(epoch, before_min + elapsed_min,
                                                      elapsed_min / (epoch - first + 1), cfg.max_train_minutes)
                                 if world.is_main else None, world)
                if epoch < last < tr.scheduler.T_max:  # anneal by the epoch the time budget will stop at
                    log.info("time budget: about %d epochs fit in --max_train_minutes %s, not %d; the cosine "
                             "schedule now ends at epoch %d", last, cfg.max_train_minutes, tr.scheduler.T_max, last)
                    tr.scheduler.T_max = last
            tr.scheduler.step()
        row = {"epoch": epoch, "train_loss": trained["loss"], "train_accuracy": trained["accuracy"],
               **{f"val_{k}": v for k, v in val.items()}, "lr": lr, "epoch_time_s": time.time() - t0,
               "data_time_s": trained["data_time"], "compute_time_s": trained["compute_time"]}
        progress.history.append(row)
        progress.next_epoch = epoch + 1
        log.info("Epoch %d/%d - Train Loss: %.4f, Val Sensitivity: %.4f, Val Specificity: %.4f, "
                 "Val AUROC: %.4f, Val Loss: %.4f, LR: %.2g, %.0fs", epoch, cfg.epochs, trained["loss"],
                 val["sensitivity"], val["specificity"], val["auroc"], val["loss"], lr, row["epoch_time_s"])
        improved = _is_better(value, progress.best_value, cfg.metric_mode)
        if improved:
            progress.best_value, progress.best_epoch = value, epoch
            progress.best_state = copy.deepcopy(tr.model.state_dict())
        stop = None
        elapsed_min = (time.time() - started) / 60
        per_epoch = elapsed_min / (epoch - first + 1)
        elapsed_min += before_min
        if epoch - progress.best_epoch >= cfg.patience and epoch < cfg.epochs:
            stop = f"early stopping: no {cfg.eval_metric} improvement for {cfg.patience} epochs"
        elif cfg.max_train_minutes and epoch < cfg.epochs and last_epoch_in_budget(
                epoch, elapsed_min, per_epoch, cfg.max_train_minutes) == epoch:
            stop = f"time budget: another epoch would pass --max_train_minutes {cfg.max_train_minutes}"
        stop = broadcast(stop, world)  # rank 0's clock decides, so that no rank trains alone
        # rank 0 writes (with the stop, so that --resume finishes a stopped run instead of training on); a write
        # that fails there (a full disk) stops every rank
        from_main(lambda: write_epoch(tr, out, epoch, val, progress, improved, stop,
                                      progress.trained_s + time.time() - started), world)
        if epoch == cfg.epochs:  # the loop ends here anyway: the stop reason stays "reached --epochs"
            break
        if stop:
            progress.stop_reason = stop
            break
    log.info("training stopped (%s); best %s %.4f at epoch %d", progress.stop_reason, cfg.eval_metric,
             progress.best_value if progress.best_value is not None else float("nan"), progress.best_epoch)
    return progress


def finish(tr: Trainer, splits: DataSplits, progress: Progress, out: Path, scope: dict | None = None,
           gate: dict | None = None) -> dict:
    """Load the best weights, calibrate, fit the gate, write the final model (with ``scope``, a carried-over
    scope classifier, and ``gate``, a carried-over gate (``carried_gate``), where their features are unchanged);
    returns the run's results."""
    best_path = out / MODEL_FILE
    if progress.best_state is None:  # resumed run that found no better epoch: best weights are on disk
        if not best_path.exists():
            raise CheckpointError(f"no epoch produced a finite {tr.cfg.eval_metric}; nothing to save")
        progress.best_state = load_checkpoint(best_path)["model_state"]
    tr.model.load_state_dict(progress.best_state)
    final = finalize(tr.predictor, splits, tr.cfg)
    if gate is not None and gate["features_digest"] == features_digest(progress.best_state):
        log.info("out-of-scope gate of %s kept: its features are unchanged, and %d validation films are too few to "
                 "refit its limit", gate["carried_from"], len(splits.val))
        final["ood_gate"], final["gate_note"] = gate["gate"], None
    if final["gate_note"]:
        log.warning("%s", final["gate_note"])
    payload = tr.payload(out, progress.best_epoch, temperature=final["temperature"], threshold=final["threshold"],
                         metrics=final["metrics_summary"], ood_gate=final["ood_gate"])
    if scope is not None and scope["features_digest"] == features_digest(progress.best_state):
        payload["scope_classifier"] = scope
        log.info("scope classifier of %s kept: the convolutional weights are unchanged", scope["info"]["carried_from"])
    elif scope is not None:
        log.warning("the scope classifier of %s is not kept: the convolutional weights changed although frozen",
                    scope["info"]["carried_from"])
    save_checkpoint(payload, best_path)
    return {
        "config": tr.cfg.to_dict(),
        "versions": versions(),
        "device": str(tr.predictor.device),
        "data": {**splits.info, "bad_file_list": [{"path": p, "reason": r} for p, r in splits.bad_files],
                 "normalization": {"mean": tr.predictor.spec.mean, "std": tr.predictor.spec.std}},
        "history": progress.history,
        "best_epoch": progress.best_epoch,
        "best_value": progress.best_value,
        "eval_metric": tr.cfg.eval_metric,
        "stop_reason": progress.stop_reason,
        "calibration": {k: final[k] for k in ("temperature", "threshold", "threshold_rule", "ece_before",
                                              "ece_after", "ece_after_cross_fitted", "reliability_before",
                                              "reliability_after")},
        "validation": final["validation"],
        "test": final["test"],
        "gate_note": final["gate_note"],
        "model_path": str(best_path),
    }


def run_training(cfg: TrainConfig, given: Collection[str] | None = None) -> dict:
    """Train, calibrate and evaluate as ``cfg`` says; returns the results written to JSON (under torchrun,
    on ranks other than 0, only ``{"config": ...}``, the config as trained: the width may be the fallback's).
    ``given``: the fields set on the command line; with ``cfg.resume`` the others are the continued run's
    (``TrainConfig.continued``; None: every field is as meant)."""
    device = resolve_device(cfg.device)
    with joined_world(device.type) as world:
        return _run(cfg, device, world, given)


def _run(cfg: TrainConfig, device: torch.device, world: World, given: Collection[str] | None = None) -> dict:
    started = time.time()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # a wrong --resume checkpoint stops the run before data preparation; rank 0 reads the file and sends it on (on
    # several nodes only rank 0's disk may have it), so every rank continues the same recipe
    last_state = None
    if cfg.resume:
        last_state, cfg = from_main(lambda: read_last_checkpoint(out, cfg, given), world)
    torch.manual_seed(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if device.type == "cuda":
        if world.distributed:
            device = torch.device("cuda", world.local_rank)
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
    log.info("pneumoscan %s, torch %s, device %s, %d CPU threads, %s", versions()["pneumoscan"],
             torch.__version__, device, torch.get_num_threads(),
             f"rank {world.rank} of {world.world_size} ({world.backend})" if world.distributed else "one process")
    cfg = pin_patients_csv(cfg)
    log.info("config: %s", json.dumps(cfg.to_dict(), sort_keys=True))

    if not cfg.resume and not cfg.overwrite:  # a run's model is never replaced by another run's first epoch
        from_main(lambda: refuse_existing_run(out), world)
    # a wrong --init_from checkpoint stops the run before data preparation; rank 0 reads the file and sends it on
    init = from_main(lambda: initial_weights(cfg), world) if cfg.init_from else None
    if init is not None:  # stored with the model, so that an ensemble can check whose patients its weights saw
        cfg = replace(cfg, init_split=init.split)
    t_data = time.time()
    # rank 0 decodes and fills the image cache; the other ranks then read it instead of decoding again
    splits = main_first(world, lambda: prepare_data(cfg.data_dir, cfg.image_size, cfg.val_fraction,
                                                    cfg.min_val_images, cfg.seed, cfg.strict, cfg.cache_dir,
                                                    cfg.cv_folds, cfg.cv_fold, cfg.cv_holdout, cfg.patients_csv,
                                                    cfg.patients_csv_sha256))
    data_prep_s = time.time() - t_data
    # which patients chose the epoch and the operating point: an ensemble of such runs checks it is calibrated on them
    cfg = replace(cfg, val_patients_sha256=patients_digest(splits.val.patients))
    if init is not None and world.is_main:
        warn_if_validated_on_seen_patients(cfg, init)
    resumed_width = last_state.get("config", {}).get("width") if last_state else None
    cfg, width_check = choose_width(cfg, len(splits.train), len(splits.val), device, world,
                                    resumed_width=None if resumed_width is None else float(resumed_width))
    tr = build_trainer(cfg, splits, device, world, init)
    progress = resume(tr, out, last_state) if last_state else Progress()
    scope, gate = carried_scope_classifier(cfg, init), carried_gate(cfg, init, len(splits.val))
    del last_state, init  # weights and optimiser state now live in the trainer
    t_train = time.time()
    fit(tr, splits, progress, out)
    train_s = time.time() - t_train
    if not world.is_main:  # rank 0 writes the results; the others return the config they trained with
        return {"config": cfg.to_dict()}
    results = finish(tr, splits, progress, out, scope, gate)
    results["width_check"] = width_check
    results["world_size"] = world.world_size
    results["distributed"] = {"world_size": world.world_size, "backend": world.backend or None,
                              "batch_size_per_process": cfg.batch_size,
                              "global_batch_size": cfg.batch_size * world.world_size}
    results["timings_s"] = {"data_preparation": data_prep_s, "training": train_s, "total": time.time() - started}
    write_outputs(results, out)
    return results


def finalize(predictor: Predictor, splits: DataSplits, cfg: TrainConfig) -> dict:
    """Temperature, screening threshold and out-of-scope gate fitted (validation, training features),
    then validation and test reports."""
    val_out = predictor.outputs(splits.val.images)
    logits, val_feats = val_out.logits, val_out.features
    train_feats = predictor.outputs(splits.train.images).features
    gate = OutOfScopeGate.fit(train_feats, splits.train.labels, val_feats)
    gate.fit_detail(splits.train.images)
    log.info("out-of-scope gate: feature-distance score limit %.2f (%.1f%% quantile of validation); detail floor "
             "%.3f (training films)", gate.threshold, 100 * gate.quantile, gate.min_detail)
    gate_note = small_fit_note(len(splits.val))  # logged by the caller, which may keep another gate instead
    y = splits.val.labels.numpy()
    if separable(logits, splits.val.labels):
        log.warning("every validation film is on the right side of the model's margin, so a temperature fitted on "
                    "them has no finite optimum: the model is left uncalibrated (no temperature) and only the "
                    "threshold is fitted; with more validation films (--val_fraction, or a larger val/) it can be "
                    "calibrated")
    temperature, threshold, _ = fit_calibrated_point(logits, splits.val.labels, cfg.target_sensitivity,
                                                     if_separable=(None, 0.0))
    raw, cal = positive_probability(logits), positive_probability(logits, temperature)
    validation = {
        "at_threshold": metrics_with_ci(y, cal, threshold, groups=splits.val.patients),
        "at_0.5": metrics_with_ci(y, cal, 0.5, groups=splits.val.patients),
    }
    test = None
    if splits.test is not None:
        t_prob = positive_probability(predictor.logits(splits.test.images), temperature)
        t_y = splits.test.labels.numpy()
        test = {"at_threshold": metrics_with_ci(t_y, t_prob, threshold, groups=splits.test.patients),
                "ece_15": expected_calibration_error(t_y, t_prob)}
        log.info("test (evaluated once, never used for choices): AUROC %.4f, sensitivity %.4f, "
                 "specificity %.4f at threshold %.4f", test["at_threshold"]["metrics"]["auroc"]["value"],
                 test["at_threshold"]["metrics"]["sensitivity"]["value"],
                 test["at_threshold"]["metrics"]["specificity"]["value"], threshold)
    ece_before, ece_after = expected_calibration_error(y, raw), expected_calibration_error(y, cal)
    ece_cross = cross_fitted_ece(logits, splits.val.labels, splits.val.patients)
    log.info("calibration on validation: temperature %s, ECE %.4f -> %.4f (%.4f fitted on other patients); "
             "threshold %.4f for sensitivity >= %.2f", temperature_text(temperature), ece_before, ece_after, ece_cross,
             threshold, cfg.target_sensitivity)
    vm = validation["at_threshold"]["metrics"]
    return {
        "temperature": temperature, "threshold": threshold,
        "threshold_rule": f"midway below the highest threshold with validation sensitivity >= "
                          f"{cfg.target_sensitivity}",
        "ece_before": ece_before, "ece_after": ece_after, "ece_after_cross_fitted": ece_cross,
        "reliability_before": reliability_bins(y, raw), "reliability_after": reliability_bins(y, cal),
        "validation": validation, "test": test, "ood_gate": gate.to_dict(), "gate_note": gate_note,
        "metrics_summary": {"val_" + k: v["value"] for k, v in vm.items()},
    }


def write_outputs(results: dict, out: Path) -> None:
    """training_results.json, history.csv, training_summary.txt and the plots."""
    write_json(results, out / "training_results.json")
    history = results["history"]
    if history:
        with open(out / "history.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(history[0]))
            writer.writeheader()
            writer.writerows(history)
        plot_history(history, out / "training_history.png")
    cal = results["calibration"]
    after = f"after T = {temperature_text(cal['temperature'], 2)} (ECE {cal['ece_after']:.3f})"
    plot_reliability({f"before (ECE {cal['ece_before']:.3f})": cal["reliability_before"],
                      after: cal["reliability_after"]},
                     out / "reliability_diagram.png", title="validation")
    write_text(out / "training_summary.txt", summary_text(results))


def summary_text(results: dict) -> str:
    """The human-readable training summary."""
    cfg, data, cal = results["config"], results["data"], results["calibration"]
    lines = [
        "pneumoscan training summary",
        "=" * 27,
        f"model: {cfg['arch']} (width x{cfg['width']}), {cfg['image_size']} px, {cfg['in_channels']} channel(s)",
        f"data: {data['root']}",
        f"validation: {data['validation']}",
    ]
    for split in ("train", "val", "test"):
        if split in data:
            d = data[split]
            lines.append(f"  {split:<5} {d['images']:5d} images, {d['patients']:4d} patients, "
                         f"NORMAL {d['NORMAL']}, PNEUMONIA {d['PNEUMONIA']}")
    if data.get("bad_files"):
        lines.append(f"  skipped {data['bad_files']} unusable file(s); listed in training_results.json")
    check = results.get("width_check")
    if check and check["width"] != check["width_checked"]:
        lines.append(f"width x{check['width']}, not x{check['width_checked']}: "
                     + ("kept from the run it resumed" if check.get("resumed") else
                        f"timed steps said an epoch at x{check['width_checked']} would take about "
                        f"{check['epoch_minutes_estimated'] * check['probe_margin']:.1f} min here (with a "
                        f"{check['probe_margin'] - 1:.0%} margin), so only {check['epochs_that_fit']} of "
                        f"{cfg['epochs']} epochs would fit in --max_train_minutes {cfg['max_train_minutes']}"))
    t = results["timings_s"]
    lines += [
        f"epochs run: {len(results['history'])}, stopped by {results['stop_reason']}",
        f"best epoch: {results['best_epoch']} ({results['eval_metric']} {results['best_value']:.4f})",
        f"time: data preparation {t['data_preparation']:.0f}s, training {t['training']:.0f}s, "
        f"total {t['total']:.0f}s on {results['device']}",
        "",
        f"calibration: temperature {temperature_text(cal['temperature'])}; validation ECE (15 bins) "
        f"{cal['ece_before']:.4f} before, {cal['ece_after']:.4f} after (fitted on the same split); "
        f"{cal['ece_after_cross_fitted']:.4f} when fitted on half the patients and measured on the other half",
        f"operating threshold: {cal['threshold']:.4f} ({cal['threshold_rule']})",
        *([f"note: {results['gate_note']}"] if results.get("gate_note") else []),
        "",
        "validation (patient-level split), at the operating threshold:",
        format_metrics_table(results["validation"]["at_threshold"]),
    ]
    if results["test"]:
        lines += ["", "test/ (evaluated once at the end; never used to choose anything):",
                  format_metrics_table(results["test"]["at_threshold"])]
    return "\n".join(lines) + "\n"

