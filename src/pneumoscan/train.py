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
from pathlib import Path

import torch
from tqdm import tqdm

from .augment import augment_batch
from .calibration import cross_fitted_ece, fit_temperature
from .checkpoint import load_checkpoint, model_payload, save_checkpoint, versions
from .config import TrainConfig
from .data import CLASS_NAMES, DataSplits, ImageSet, prepare_data
from .errors import CheckpointError
from .evaluate import predict_logits, predict_outputs, probabilities, resolve_device
from .gate import OutOfScopeGate
from .losses import build_loss
from .metrics import (
    binary_metrics,
    expected_calibration_error,
    format_metrics_table,
    metrics_with_ci,
    reliability_bins,
    threshold_for_sensitivity,
)
from .model import build_model, model_kwargs
from .plots import plot_history, plot_reliability
from .preprocess import to_model_input
from .results import write_json

log = logging.getLogger(__name__)

MODEL_FILE = "medical_cnn_model.pth"
LAST_FILE = "checkpoint_last.pth"
# Config fields that must not change when resuming a run.
_RESUME_FIXED = ("arch", "width", "image_size", "in_channels", "dropout", "seed", "val_fraction")


def normalization_stats(images: torch.Tensor) -> dict[str, float]:
    """Mean and std of the training images in [0, 1] (a sample of at most 512)."""
    sample = images[:: max(1, len(images) // 512)].float() / 255.0
    return {"mean": float(sample.mean()), "std": float(sample.std())}


def train_one_epoch(model, data: ImageSet, optimizer, criterion, cfg: TrainConfig, norm: dict,
                    device: torch.device, gen: torch.Generator, epoch: int) -> dict:
    """One pass over ``data`` in shuffled batches; returns loss, accuracy and where the time went."""
    model.train()
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
    total_loss, correct, seen = 0.0, 0, 0
    data_time = compute_time = 0.0
    n_batches = math.ceil(len(data) / cfg.batch_size)
    bar = tqdm(range(n_batches), desc=f"epoch {epoch}", unit="batch", leave=False, disable=None)
    for b in bar:
        t0 = time.perf_counter()
        idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
        if len(idx) < 2:  # BatchNorm cannot train on a batch of one
            continue
        imgs = data.images[idx].to(device, non_blocking=True)
        target = data.labels[idx].to(device, non_blocking=True)
        x = imgs.float().div_(255.0).unsqueeze(1)
        x = augment_batch(x, cfg.augment, gen)
        x = to_model_input(x, norm["mean"], norm["std"], cfg.in_channels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x)
        loss = criterion(logits.float(), target)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at epoch {epoch}, batch {b}; "
                                     f"lower --lr")
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(idx)
        correct += int((logits.argmax(1) == target).sum())
        seen += len(idx)
        t2 = time.perf_counter()
        data_time += t1 - t0
        compute_time += t2 - t1
        bar.set_postfix(loss=f"{total_loss / seen:.4f}")
    return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1),
            "data_time": data_time, "compute_time": compute_time}


def evaluate(model, data: ImageSet, criterion, norm: dict, cfg: TrainConfig, device) -> tuple[dict, torch.Tensor]:
    """Validation loss and metrics at 0.5 (uncalibrated), and the logits."""
    logits = predict_logits(model, data.images, norm, cfg.in_channels, device, batch_size=2 * cfg.batch_size)
    loss = float(criterion(logits, data.labels))
    m = binary_metrics(data.labels.numpy(), probabilities(logits, None), 0.5)
    return {"loss": loss, **m}, logits


def _is_better(value: float, best: float | None, mode: str) -> bool:
    if math.isnan(value):
        return False
    return best is None or (value > best if mode == "max" else value < best)


def _check_resume(state: dict, cfg: TrainConfig) -> None:
    old = state.get("config", {})
    changed = [f"{k}: {old.get(k)!r} -> {getattr(cfg, k)!r}" for k in _RESUME_FIXED
               if k in old and old[k] != getattr(cfg, k)]
    if changed:
        raise CheckpointError("cannot --resume with a different " + "; ".join(changed)
                              + " (use the original flags or a new --output_dir)")


def run_training(cfg: TrainConfig) -> dict:
    """Train, calibrate and evaluate as ``cfg`` says; returns the results written to JSON."""
    started = time.time()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
    log.info("pneumoscan %s, torch %s, device %s, %d CPU threads", versions()["pneumoscan"],
             torch.__version__, device, torch.get_num_threads())
    log.info("config: %s", json.dumps(cfg.to_dict(), sort_keys=True))

    t_data = time.time()
    splits = prepare_data(cfg.data_dir, cfg.image_size, cfg.val_fraction, cfg.min_val_images,
                          cfg.seed, cfg.strict, cfg.cache_dir)
    data_prep_s = time.time() - t_data
    norm = normalization_stats(splits.train.images)
    counts = [splits.train.class_counts()[c] for c in CLASS_NAMES]

    model = build_model(cfg).to(device).to(memory_format=torch.channels_last)
    kw = model_kwargs(cfg.arch, cfg.in_channels, cfg.width, cfg.dropout)
    log.info("model %s: %d parameters", cfg.arch, sum(p.numel() for p in model.parameters()))
    criterion = build_loss(cfg.loss, counts, cfg.focal_gamma).to(device)
    eval_criterion = build_loss(cfg.loss, counts, cfg.focal_gamma)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode=cfg.metric_mode, factor=cfg.lr_factor, patience=cfg.lr_patience, min_lr=cfg.min_lr)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)

    history: list[dict] = []
    best_value, best_epoch, start_epoch = None, 0, 1
    last_path, best_path = out / LAST_FILE, out / MODEL_FILE
    if cfg.resume:
        if not last_path.exists():
            raise CheckpointError(f"--resume: no {LAST_FILE} in {out}; start without --resume")
        state = load_checkpoint(last_path)
        _check_resume(state, cfg)
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        scheduler.load_state_dict(state["scheduler_state"])
        gen.set_state(state["generator_state"].to(gen.device) if device.type == "cuda"
                      else state["generator_state"])
        torch.set_rng_state(state["torch_rng_state"])
        history = state["history"]
        best_value, best_epoch = state["best_value"], state["best_epoch"]
        start_epoch = state["epoch"] + 1
        log.info("resumed from %s at epoch %d (best %s %.4f at epoch %d)", last_path, start_epoch,
                 cfg.eval_metric, best_value if best_value is not None else float("nan"), best_epoch)

    def payload(epoch: int, metrics: dict) -> dict:
        return model_payload(model, arch=cfg.arch, model_kw=kw, image_size=cfg.image_size,
                             normalization=norm, config=cfg.to_dict(), metrics={"val": metrics},
                             epoch=epoch, model_version=f"{out.name}-epoch{epoch}")

    train_started = time.time()
    stop_reason = "reached --epochs"
    best_state = None
    for epoch in range(start_epoch, cfg.epochs + 1):
        t0 = time.time()
        tr = train_one_epoch(model, splits.train, optimizer, criterion, cfg, norm, device, gen, epoch)
        val, _ = evaluate(model, splits.val, eval_criterion, norm, cfg, device)
        value = val[cfg.eval_metric]
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step(value)
        row = {"epoch": epoch, "train_loss": tr["loss"], "train_accuracy": tr["accuracy"],
               **{f"val_{k}": v for k, v in val.items()}, "lr": lr, "epoch_time_s": time.time() - t0,
               "data_time_s": tr["data_time"], "compute_time_s": tr["compute_time"]}
        history.append(row)
        log.info("Epoch %d/%d - Train Loss: %.4f, Val Sensitivity: %.4f, Val Specificity: %.4f, "
                 "Val AUROC: %.4f, Val Loss: %.4f, LR: %.2g, %.0fs", epoch, cfg.epochs, tr["loss"],
                 val["sensitivity"], val["specificity"], val["auroc"], val["loss"], lr, row["epoch_time_s"])
        if _is_better(value, best_value, cfg.metric_mode):
            best_value, best_epoch = value, epoch
            best_state = copy.deepcopy(model.state_dict())
            save_checkpoint(payload(epoch, val), best_path)
        save_checkpoint({**payload(epoch, val), "optimizer_state": optimizer.state_dict(),
                         "scheduler_state": scheduler.state_dict(), "generator_state": gen.get_state().cpu(),
                         "torch_rng_state": torch.get_rng_state(), "history": history,
                         "best_value": best_value, "best_epoch": best_epoch}, last_path)
        if epoch - best_epoch >= cfg.patience:
            stop_reason = f"early stopping: no {cfg.eval_metric} improvement for {cfg.patience} epochs"
            break
        elapsed_min = (time.time() - train_started) / 60
        per_epoch = elapsed_min / (epoch - start_epoch + 1)
        if cfg.max_train_minutes and elapsed_min + per_epoch > cfg.max_train_minutes:
            stop_reason = f"time budget: another epoch would pass --max_train_minutes {cfg.max_train_minutes}"
            break
    log.info("training stopped (%s); best %s %.4f at epoch %d", stop_reason, cfg.eval_metric,
             best_value if best_value is not None else float("nan"), best_epoch)
    train_s = time.time() - train_started

    if best_state is None:  # resumed run that found no better epoch: best weights are on disk
        if not best_path.exists():
            raise CheckpointError(f"no epoch produced a finite {cfg.eval_metric}; nothing to save")
        best_state = load_checkpoint(best_path)["model_state"]
    model.load_state_dict(best_state)
    final = finalize(model, splits, cfg, norm, device)
    save_checkpoint(model_payload(model, arch=cfg.arch, model_kw=kw, image_size=cfg.image_size,
                                  normalization=norm, config=cfg.to_dict(), temperature=final["temperature"],
                                  threshold=final["threshold"], metrics=final["metrics_summary"],
                                  epoch=best_epoch, model_version=f"{out.name}-epoch{best_epoch}",
                                  ood_gate=final["ood_gate"]), best_path)

    results = {
        "config": cfg.to_dict(),
        "versions": versions(),
        "device": str(device),
        "data": {**splits.info, "bad_file_list": [{"path": p, "reason": r} for p, r in splits.bad_files],
                 "normalization": norm},
        "history": history,
        "best_epoch": best_epoch,
        "best_value": best_value,
        "eval_metric": cfg.eval_metric,
        "stop_reason": stop_reason,
        "calibration": {k: final[k] for k in ("temperature", "threshold", "threshold_rule", "ece_before",
                                              "ece_after", "ece_after_cross_fitted", "reliability_before",
                                              "reliability_after")},
        "validation": final["validation"],
        "test": final["test"],
        "timings_s": {"data_preparation": data_prep_s, "training": train_s,
                      "total": time.time() - started},
        "model_path": str(best_path),
    }
    write_outputs(results, out)
    return results


def finalize(model, splits: DataSplits, cfg: TrainConfig, norm: dict, device) -> dict:
    """Temperature, screening threshold and out-of-scope gate fitted (validation, training features),
    then validation and test reports."""
    logits, val_feats = predict_outputs(model, splits.val.images, norm, cfg.in_channels, device)
    _, train_feats = predict_outputs(model, splits.train.images, norm, cfg.in_channels, device)
    gate = OutOfScopeGate.fit(train_feats, splits.train.labels, val_feats)
    log.info("out-of-scope gate: feature-distance score limit %.2f (%.1f%% quantile of validation)",
             gate.threshold, 100 * gate.quantile)
    y = splits.val.labels.numpy()
    temperature = fit_temperature(logits, splits.val.labels)
    raw, cal = probabilities(logits, None), probabilities(logits, temperature)
    threshold = threshold_for_sensitivity(y, cal, cfg.target_sensitivity)
    validation = {
        "at_threshold": metrics_with_ci(y, cal, threshold, groups=splits.val.patients),
        "at_0.5": metrics_with_ci(y, cal, 0.5, groups=splits.val.patients),
    }
    test = None
    if splits.test is not None:
        t_logits = predict_logits(model, splits.test.images, norm, cfg.in_channels, device)
        t_prob = probabilities(t_logits, temperature)
        t_y = splits.test.labels.numpy()
        test = {"at_threshold": metrics_with_ci(t_y, t_prob, threshold, groups=splits.test.patients),
                "ece_15": expected_calibration_error(t_y, t_prob)}
        log.info("test (evaluated once, never used for choices): AUROC %.4f, sensitivity %.4f, "
                 "specificity %.4f at threshold %.4f", test["at_threshold"]["metrics"]["auroc"]["value"],
                 test["at_threshold"]["metrics"]["sensitivity"]["value"],
                 test["at_threshold"]["metrics"]["specificity"]["value"], threshold)
    ece_before, ece_after = expected_calibration_error(y, raw), expected_calibration_error(y, cal)
    ece_cross = cross_fitted_ece(logits, splits.val.labels, splits.val.patients)
    log.info("calibration on validation: temperature %.3f, ECE %.4f -> %.4f (%.4f fitted on other patients); "
             "threshold %.4f for sensitivity >= %.2f", temperature, ece_before, ece_after, ece_cross, threshold,
             cfg.target_sensitivity)
    vm = validation["at_threshold"]["metrics"]
    return {
        "temperature": temperature, "threshold": threshold,
        "threshold_rule": f"midway below the highest threshold with validation sensitivity >= "
                          f"{cfg.target_sensitivity}",
        "ece_before": ece_before, "ece_after": ece_after, "ece_after_cross_fitted": ece_cross,
        "reliability_before": reliability_bins(y, raw), "reliability_after": reliability_bins(y, cal),
        "validation": validation, "test": test, "ood_gate": gate.to_dict(),
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
    plot_reliability({f"before (ECE {cal['ece_before']:.3f})": cal["reliability_before"],
                      f"after T = {cal['temperature']:.2f} (ECE {cal['ece_after']:.3f})": cal["reliability_after"]},
                     out / "reliability_diagram.png", title="validation")
    (out / "training_summary.txt").write_text(summary_text(results))


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
    t = results["timings_s"]
    lines += [
        f"epochs run: {len(results['history'])}, stopped by {results['stop_reason']}",
        f"best epoch: {results['best_epoch']} ({results['eval_metric']} {results['best_value']:.4f})",
        f"time: data preparation {t['data_preparation']:.0f}s, training {t['training']:.0f}s, "
        f"total {t['total']:.0f}s on {results['device']}",
        "",
        f"calibration: temperature {cal['temperature']:.3f}; validation ECE (15 bins) "
        f"{cal['ece_before']:.4f} before, {cal['ece_after']:.4f} after (fitted on the same split); "
        f"{cal['ece_after_cross_fitted']:.4f} when fitted on half the patients and measured on the other half",
        f"operating threshold: {cal['threshold']:.4f} ({cal['threshold_rule']})",
        "",
        "validation (patient-level split), at the operating threshold:",
        format_metrics_table(results["validation"]["at_threshold"]),
    ]
    if results["test"]:
        lines += ["", "test/ (evaluated once at the end; never used to choose anything):",
                  format_metrics_table(results["test"]["at_threshold"])]
    return "\n".join(lines) + "\n"

