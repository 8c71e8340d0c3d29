"""Command-line entry points: ``pneumoscan train | evaluate | predict | calibrate``.

Each ``*_main(argv)`` parses flags, configures logging once, and returns an exit code:
0 success, 1 some inputs failed (the rest were processed), 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from .atomic import check_writable, refuse_input_suffix, same_file, short_name
from .errors import DataError, OutputPathError, PneumoscanError
from .names import printable

log = logging.getLogger("pneumoscan")

EXIT_OK, EXIT_SOME_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def user_path(value: str) -> str:
    """The ``type`` of every path flag: ``~`` and ``~user`` expanded once, where the flag is read (the shell
    leaves ``--output_path=~/m.json`` as it is), so that what is checked, read and written is one path."""
    return os.path.expanduser(value)


def _say(text: str) -> None:
    """A line on stdout; the odd bytes of file names that are not UTF-8 as ``\\xNN`` (a strict UTF-8 stdout would
    refuse them, before the outputs are written)."""
    sys.stdout.write(printable(text) + "\n")


class _PrintableFormatter(logging.Formatter):
    """Log lines with file names as ``_say`` shows them (a log file is opened strict: its handler would
    print a traceback for each line naming a film whose name is not UTF-8)."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


def configure_logging(log_file: Path | None = None, verbose: bool = False, quiet: bool = False) -> None:
    """Send the package's log to stderr (and ``log_file``); called once per entry point.

    ``quiet`` keeps warnings and errors only (the ranks other than 0 under torchrun).
    """
    root = logging.getLogger("pneumoscan")
    root.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    fmt = _PrintableFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="a"))
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    root.propagate = False


def _train_parser() -> argparse.ArgumentParser:
    from .augment import LEVELS
    from .config import EVAL_METRICS, LOSSES, LR_SCHEDULES, PRESETS
    from .model import ARCHITECTURES
    from .preprocess import INTENSITIES

    p = argparse.ArgumentParser(
        prog="pneumoscan train",
        description="Train a pneumonia classifier on DIR/{train,val,test}/{NORMAL,PNEUMONIA}.")
    p.add_argument("--data_dir", type=user_path, required=True,
                   help="data set root (holds train/, optional val/ test/)")
    p.add_argument("--output_dir", type=user_path,
                   help="where the model, plots, logs and results go (./training_output)")
    p.add_argument("--preset", choices=list(PRESETS),
                   help="full (default): the shipped model's recipe; fast: about 10 minutes on a 2-core CPU "
                        "(with --resume: the continued run's)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch_size", type=int)
    p.add_argument("--lr", type=float, help="Adam learning rate")
    p.add_argument("--weight_decay", type=float)
    p.add_argument("--image_size", type=int, help="square input size in pixels, multiple of 32 (224)")
    p.add_argument("--in_channels", type=int, choices=(1, 3))
    p.add_argument("--arch", choices=list(ARCHITECTURES))
    p.add_argument("--width", type=float, help="channel-width multiplier (1.0 = the seed's)")
    p.add_argument("--fallback_width", type=float, metavar="WIDTH",
                   help="with --max_train_minutes: train at this width instead if a few timed steps show that "
                        "--epochs at --width would not fit in the budget, also when you raise --epochs or lower "
                        "the budget (the fast preset: 0.25; 0: off; --width without --fallback_width turns it off)")
    p.add_argument("--dropout", type=float)
    p.add_argument("--loss", choices=LOSSES)
    p.add_argument("--focal_gamma", type=float)
    p.add_argument("--augment", choices=list(LEVELS))
    p.add_argument("--mixup", type=float, metavar="ALPHA",
                   help="mix each training batch with a shuffled copy, weights from Beta(ALPHA, ALPHA) (0.2 is "
                        "usual; 0: off, the default)")
    p.add_argument("--intensity", choices=INTENSITIES,
                   help="raw: grey levels as decoded (the shipped model's); equalize: each film's levels "
                        "replaced by their rank in it, so exposure and contrast curves do not change the input")
    p.add_argument("--eval_metric", choices=list(EVAL_METRICS),
                   help="validation metric for best checkpoint, LR schedule and early stopping")
    p.add_argument("--patience", type=int, help="early-stopping patience in epochs")
    p.add_argument("--lr_schedule", choices=LR_SCHEDULES,
                   help="plateau: halve the LR when the validation metric stalls (the seed's); cosine: anneal "
                        "towards 1e-6 over --epochs")
    p.add_argument("--lr_patience", type=int)
    p.add_argument("--val_fraction", type=float, help="share of patients for validation when val/ is absent")
    p.add_argument("--cv_folds", type=int,
                   help="patient-level k-fold cross-validation: train K models (OUTPUT_DIR/foldI), each validated "
                        "on one fold, and report out-of-fold AUROC, threshold and calibration (0: off)")
    p.add_argument("--cv_fold", type=int, help="with --cv_folds K: train only this fold (0..K-1)")
    p.add_argument("--cv_holdout", action="store_true", default=None,
                   help="with --cv_folds: set the usual validation patients aside first; they calibrate the "
                        "folds' ensemble, written as OUTPUT_DIR/medical_cnn_model.pth")
    _add_patients_flag(p, dest="patients_csv", default=None)
    p.add_argument("--target_sensitivity", type=float, help="operating threshold's validation sensitivity")
    p.add_argument("--max_train_minutes", type=float,
                   help="stop before an epoch would pass this budget (the run's training time, --resume included)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--num_threads", type=int, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--cache_dir", type=user_path,
                   help="decoded-image cache (default ~/.cache/pneumoscan; 'none' disables)")
    p.add_argument("--strict", action="store_true", default=None,
                   help="stop before training if any file cannot be decoded (default: skip and list them)")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue from OUTPUT_DIR/checkpoint_last.pth (with --cv_folds: the k-fold run's folds); "
                        "the flags not given again are the run's own")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="start a new run in an OUTPUT_DIR that holds one, replacing its model (without it, and "
                        "without --resume, such a folder is refused)")
    p.add_argument("--init_from", type=user_path, metavar="CHECKPOINT",
                   help="fine-tune: start from this checkpoint's weights and input normalisation ('shipped' "
                        "for the shipped model) instead of a fresh initialisation; its --arch and --width "
                        "must match")
    p.add_argument("--freeze_blocks", type=int, metavar="N",
                   help="with --init_from: keep the first N of the five convolutional blocks (and their batch-norm "
                        "statistics) as they are and train the rest; 5 trains only the classifier head (FC "
                        "512->256->2), which keeps every feature the out-of-scope checks read (last-layer "
                        "retraining: about a third of a full step) and so keeps --init_from's scope classifier. "
                        "Default 0: train everything")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


REPLACED_LOG = "training.replaced.log"  # where --overwrite moves the log of the run it replaces


def _keep_replaced_log(log_path: Path) -> None:
    """--overwrite: the log of the run in the folder is appended to ``REPLACED_LOG`` beside it (never replaced: an
    attempt that fails before training leaves the old model in place, and its log must stay too), and the new
    run's log starts empty."""
    with open(log_path.with_name(REPLACED_LOG), "ab") as kept, open(log_path, "rb") as old:
        shutil.copyfileobj(old, kept)
    log_path.unlink()


def train_main(argv: list[str] | None = None) -> int:
    """``pneumoscan train`` / ``train_medical_model.py``."""
    from .config import TrainConfig
    from .distributed import env_world
    from .predict import resolve_device
    from .train import run_training

    args = _train_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("preset", "verbose")}
    try:
        cfg = TrainConfig.from_overrides(args.preset, **overrides)
        # with --resume, the flags not given again are the continued run's own (train.read_last_checkpoint)
        given = {k for k, v in overrides.items() if v is not None} | ({"preset"} if args.preset else set())
        if args.cv_fold is not None and not cfg.cv_folds:  # 0 is the default, so the config cannot tell
            raise ValueError(f"--cv_fold {args.cv_fold} needs --cv_folds K (K >= 2)")
        if args.fallback_width and not cfg.max_train_minutes:
            raise ValueError("--fallback_width is the narrower network used where --max_train_minutes cannot hold "
                             "the epochs: give --max_train_minutes too")
        resolve_device(cfg.device)  # --device cuda without a GPU: a usage error, before anything is written
        world = env_world()
        if world.is_main:
            check_writable(cfg.output_dir, "--output_dir", folder=True)
    except ValueError as exc:  # OutputPathError too
        _train_parser().error(str(exc))
    # under torchrun only rank 0 writes training.log; the other ranks print warnings and errors
    log_path = Path(cfg.output_dir) / "training.log"
    if cfg.overwrite and world.is_main and log_path.is_file() and log_path.stat().st_size:
        _keep_replaced_log(log_path)
    configure_logging(log_path if world.is_main else None, args.verbose, quiet=not world.is_main)
    try:
        if cfg.cv_folds and args.cv_fold is None:  # every fold, then the out-of-fold report (and ensemble)
            from .cv import run_cv

            run_cv(cfg, given)
            log.info("cross-validation written to %s (cv_summary.txt, cv_results.json)", cfg.output_dir)
            return EXIT_OK
        results = run_training(cfg, given)
    except PneumoscanError as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        log.error("interrupted; the last finished epoch is in %s/checkpoint_last.pth: continue with --resume",
                  cfg.output_dir)
        return 130
    if "model_path" in results:  # rank 0 (or the only process)
        log.info("model written to %s; summary in %s/training_summary.txt", results["model_path"], cfg.output_dir)
    return EXIT_OK


def _predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pneumoscan predict",
                                description="Predict pneumonia on one image or every image in a folder.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image_path", type=user_path, help="one image file")
    src.add_argument("--image_dir", type=user_path, help="a folder of images (searched recursively)")
    p.add_argument("--model_path", type=user_path, help="checkpoint from pneumoscan train (default: the shipped model)")
    p.add_argument("--output_path", type=user_path,
                   help="write results here: .json (one document at the end; an existing file is replaced) or "
                        ".jsonl (one line per file, written as it goes, for large folders; an existing file is "
                        "never replaced, see --resume). Default: print JSON to stdout")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted .jsonl output: files already in it are skipped")
    p.add_argument("--threshold", type=float, help="override the model's operating threshold on P(PNEUMONIA)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batch_size", type=int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--decode_workers", type=int, default=2,
                   help="threads decoding the next images while the model runs (0: none; default 2)")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "onnx", "onnx-int8"),
                   help="what runs the model: auto (int8 ONNX Runtime on a CPU when the model carries its int8 "
                        "calibration, else torch), torch (the fp32 reference; bf16 autocast on CUDA), onnx, onnx-int8")
    p.add_argument("--calibration_dir", type=user_path,
                   help="onnx-int8 only, first use of a model: the data set it was trained on (for calibration)")
    p.add_argument("--no_recursive", action="store_true", help="only the top level of --image_dir")
    p.add_argument("--heatmap_dir", type=user_path,
                   help="write a Grad-CAM overlay PNG per image here (original geometry)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _summary_line(r) -> str:
    return (f"{r.image_path}: {r.prediction} (P(PNEUMONIA) = {r.probabilities['PNEUMONIA']:.4f}, "
            f"threshold {r.threshold:.4f}{'' if r.calibrated else ', uncalibrated'}), "
            f"confidence {r.confidence:.3f}, uncertainty {r.uncertainty:.3f}, risk {r.risk_level}")


def _progress(total: int):
    """A progress bar with rate and ETA on a terminal (stderr); silent when stderr is not a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, unit="img", file=sys.stderr, disable=None if total > 1 else True,
                dynamic_ncols=True, smoothing=0.1)


def _stream_jsonl(engine, files: list, path: str | Path, resume: bool, heatmap_dir: str | None,
                  progress: bool = True) -> tuple[int, int]:
    """Stream outcomes into ``path`` as JSON Lines; returns (predicted, failed) in this run."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .inference import InferenceFailure
    from .results import JsonlWriter

    predicted = failed = 0
    with JsonlWriter(path, resume=resume) as writer:
        _check_made_with(path, writer.made_with, engine)
        done = _done_keys(writer.done)
        todo = [f for f in files if not done & set(_keys(f))]
        if writer.done:
            log.info("--resume: %d of %d file(s) already in %s; predicting the other %d",
                     len(files) - len(todo), len(files), path, len(todo))
        with _progress(len(todo) if progress else 0) as bar, logging_redirect_tqdm(loggers=[log]):
            for outcome in engine.iter_predict(todo, heatmap_dir=heatmap_dir):
                writer.write(outcome)
                if isinstance(outcome, InferenceFailure):
                    failed += 1
                else:
                    predicted += 1
                bar.update()
    return predicted, failed


def _check_made_with(path, made_with: set[tuple], engine) -> None:
    """One file, one model and one operating point: mixed lines could not be read as one result.

    Raises:
        DataError: ``path`` holds results of another (model_version, threshold) than ``engine``'s.
    """
    now = (engine.info.get("model_version"), engine.threshold)
    other = sorted((str(v), t) for v, t in made_with if (v, t) != now)
    if other:
        raise DataError(f"--resume: {path} holds results of model {other[0][0]} at threshold {other[0][1]}, this "
                        f"run would add results of {now[0]} at threshold {now[1]}; resume with the same "
                        f"--model_path and --threshold, or write a new file")


def _same_file_key(path) -> str:
    """A path as an absolute, resolved string, as the JSON Lines file has it (``printable``): ``--image_dir runs``
    and ``--image_dir /abs/runs`` name one file."""
    try:
        return printable(str(Path(path).expanduser().resolve()))
    except (OSError, RuntimeError):
        return printable(str(path))


def _predict_jsonl(engine, files: list, args) -> tuple[int, int]:
    if _left_parts(args.output_path):  # an interrupted torchrun run: continued by one process, or refused
        _prepare_jsonl_output(args.output_path, files, args.resume, engine)
    predicted, failed = _stream_jsonl(engine, files, args.output_path, args.resume, args.heatmap_dir)
    log.info("%d prediction(s), %d error(s) written to %s", predicted, failed, args.output_path)
    return predicted, failed


def _part_path(output_path: str, rank: int, world_size: int) -> Path:
    """Rank ``rank``'s share under torchrun: JSON Lines, named for the whole output name (``out.json`` and
    ``out.jsonl`` have their own)."""
    out = Path(output_path)
    return out.with_name(f".{short_name(out.name)}.rank{rank}-of-{world_size}.part")


def _left_parts(output_path: str) -> list[Path]:
    """Part files an earlier run left beside ``output_path``, whatever its number of processes."""
    out = Path(output_path)
    name = re.compile(rf"\.{re.escape(short_name(out.name))}\.rank\d+-of-\d+\.part")
    if not out.parent.is_dir():
        return []
    return sorted(p for p in out.parent.iterdir() if name.fullmatch(p.name) and p.is_file())


def _keys(path) -> tuple[str, str]:
    """The two spellings under which a JSON Lines file may hold ``path``: as listed and resolved."""
    return printable(str(path)), _same_file_key(path)


def _done_keys(paths: set[str]) -> set[str]:
    """The ``image_path`` values a JSON Lines file holds, with their resolved spellings (``_keys``)."""
    return paths | {_same_file_key(p) for p in paths}


def _drop_json_parts(output_path: str) -> set[str]:
    """Rank 0, before a ``.json`` run under torchrun: the parts an interrupted run of it left cannot be resumed
    (a .json document is written only at the end); they are replaced, with a warning. Returns no files done."""
    parts = _left_parts(output_path)
    if parts:
        log.warning("predicting again the files of an interrupted run to %s (a .json run cannot be resumed; a "
                    ".jsonl one can): its part files %s are replaced", output_path, ", ".join(p.name for p in parts))
        for part in parts:
            part.unlink()
    return set()


def _prepare_jsonl_output(output_path: str, files: list, resume: bool, engine) -> set[str]:
    """Before the files of a ``.jsonl`` run are predicted (on rank 0, under torchrun before the ranks share
    them out): the keys (``_keys``) of the files already in ``output_path``.

    With ``resume``, the lines of part files left by an interrupted run (of this or any other number of
    processes) are first appended to the output, each file once and in listing order (files no longer
    listed last: nothing is dropped), and the parts removed. The output then holds every finished
    result, and the ranks share out only the rest; a single-process run's output resumes the same way.

    Raises:
        FileExistsError: without ``resume``, the output or part files of an earlier run exist.
        DataError: a damaged output or part file, or results of another model or threshold.
    """
    from .atomic import atomic_path
    from .results import JsonlWriter, iter_jsonl, made_with

    out, parts = Path(output_path), _left_parts(output_path)
    if not resume:
        if out.exists():
            raise FileExistsError(f"{output_path} already exists: pass --resume to continue it, or remove it")
        if parts:
            raise FileExistsError(f"part files of an interrupted run are beside {output_path} "
                                  f"({', '.join(p.name for p in parts)}): pass --resume to continue them, or "
                                  f"remove them to start over")
        return set()
    done: set[str] = set()
    if out.exists():
        with JsonlWriter(out, resume=True) as writer:  # drops a last line cut by a kill, checks the rest
            _check_made_with(output_path, writer.made_with, engine)
            done = _done_keys(writer.done)
    if parts:
        pairs: set[tuple] = set()
        entries: list[tuple[bytes, set[str]]] = []  # (line, its file's keys) of every part line not yet in out
        for part in parts:
            for line, obj in iter_jsonl(part):
                keys = set(_keys(obj["image_path"])) if obj.get("image_path") is not None else set()
                if not keys & done:
                    entries.append((line, keys))
                    done |= keys
                if (pair := made_with(obj)) is not None:
                    pairs.add(pair)
        _check_made_with(", ".join(str(p) for p in parts), pairs, engine)
        index = {key: i for i, (_, keys) in enumerate(entries) for key in keys}
        order = list(dict.fromkeys(i for f in files for key in _keys(f) if (i := index.get(key)) is not None))
        listed = set(order)
        order += [i for i in range(len(entries)) if i not in listed]
        with atomic_path(out, durable=True) as tmp, open(tmp, "wb") as dst:
            if out.exists():
                with open(out, "rb") as src:
                    shutil.copyfileobj(src, dst)
            for i in order:
                dst.write(entries[i][0])
        for part in parts:
            part.unlink()
        log.info("--resume: %d result(s) from %d part file(s) of an interrupted run added to %s",
                 len(entries), len(parts), output_path)
    return done


def _document(info: dict, n_files: int, results: list, errors: list) -> dict:
    """The ``.json`` output: model, summary, results and errors."""
    return {"model": info, "summary": {"files": n_files, "predicted": len(results), "failed": len(errors)},
            "results": results, "errors": errors}


def _predict_sharded(engine, files: list, args, world) -> tuple[int, int]:
    """Under torchrun: each rank predicts every WORLD_SIZE-th file into its own part file; rank 0 then
    merges the parts in listing order into ``--output_path`` (each file exactly once) and removes them."""
    from .atomic import atomic_path
    from .distributed import all_sum, from_main
    from .results import write_json

    jsonl = args.output_path.lower().endswith(".jsonl")
    part = _part_path(args.output_path, world.rank, world.world_size)
    done = from_main(lambda: _prepare_jsonl_output(args.output_path, files, args.resume, engine) if jsonl
                     else _drop_json_parts(args.output_path), world)
    todo = [f for f in files if not done & set(_keys(f))]
    if done:
        log.info("--resume: %d of %d file(s) already in %s; predicting the other %d", len(files) - len(todo),
                 len(files), args.output_path, len(todo))
    shard = todo[world.rank::world.world_size]
    log.info("rank %d of %d: %d of the %d file(s)", world.rank, world.world_size, len(shard), len(todo))
    failure = None
    try:
        part.unlink(missing_ok=True)  # left parts were folded in or dropped above: this one is new (or no file)
        _stream_jsonl(engine, shard, part, False, args.heatmap_dir, progress=world.is_main)
    except (PneumoscanError, ValueError, OSError) as exc:  # every rank must still reach the count below
        failure = exc
    unfinished = int(all_sum([float(failure is not None)], world)[0])  # also the barrier before the merge
    if failure is not None:
        raise failure
    if unfinished:
        kept = " (--resume continues them)" if jsonl else ""
        raise DataError(f"{unfinished} of {world.world_size} rank(s) could not finish their share of the files "
                        f"(each says why in its own error line); nothing was merged into {args.output_path}, "
                        f"and the finished ranks' part files are kept{kept}")
    if not world.is_main:
        return 0, 0
    parts = [_part_path(args.output_path, r, world.world_size) for r in range(world.world_size)]

    def merged() -> Iterator[tuple[str, dict]]:
        """(line, outcome) of every file predicted in listing order: file i is the next line of part
        i % WORLD_SIZE."""
        readers = [open(p, encoding="utf-8") for p in parts]
        try:
            for i, path in enumerate(todo):
                line = readers[i % world.world_size].readline()
                outcome = json.loads(line)
                if outcome.get("image_path") != printable(str(path)) and \
                        not same_file(outcome.get("image_path") or "", path):
                    raise DataError(f"part file {parts[i % world.world_size]} is not in listing order at {path} "
                                    f"(changed while the ranks wrote it?); nothing was merged, run again with "
                                    f"--resume")
                yield line, outcome
        finally:
            for r in readers:
                r.close()

    try:
        if jsonl:  # lines go straight to the merged file: constant memory, as in one process
            failed = 0
            with atomic_path(args.output_path, durable=True) as tmp, open(tmp, "w", encoding="utf-8") as out:
                if args.resume and Path(args.output_path).exists():  # earlier results first, as one process
                    with open(args.output_path, encoding="utf-8") as earlier:
                        shutil.copyfileobj(earlier, out)
                for line, outcome in merged():
                    out.write(line)
                    failed += "error" in outcome
            predicted = len(todo) - failed
        else:
            outcomes = [outcome for _, outcome in merged()]
            errors = [o for o in outcomes if "error" in o]
            results = [o for o in outcomes if "error" not in o]
            write_json(_document(engine.info, len(files), results, errors), args.output_path)
            predicted, failed = len(results), len(errors)
    except OSError as exc:  # checked before the work, but a disk can fill up meanwhile: the parts keep it all
        raise OutputPathError(f"cannot write {args.output_path}: {exc.strerror or exc}; every result is kept in "
                              f"the part files {', '.join(str(p) for p in parts)}") from exc
    for p in parts:
        p.unlink()
    log.info("%d prediction(s), %d error(s) from %d processes written to %s", predicted, failed,
             world.world_size, args.output_path)
    return predicted, failed


def _predict_document(engine, files: list, args) -> tuple[int, int]:
    """Today's JSON document (model, summary, results, errors) to ``--output_path`` or stdout."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .inference import InferenceFailure
    from .results import dumps, write_json

    results, errors = [], []
    with _progress(len(files)) as bar, logging_redirect_tqdm(loggers=[log]):
        for outcome in engine.iter_predict(files, heatmap_dir=args.heatmap_dir):
            (errors if isinstance(outcome, InferenceFailure) else results).append(outcome)
            bar.update()
    document = _document(engine.info, len(files), results, errors)
    if args.output_path:
        try:
            write_json(document, args.output_path)
        except OSError as exc:  # checked before the work, but a disk can fill up meanwhile: keep the results
            _say(dumps(document))
            raise OutputPathError(f"cannot write {args.output_path}: {exc.strerror or exc}; the results were "
                                  f"printed to stdout instead") from exc
        log.info("%d prediction(s), %d error(s) written to %s", len(results), len(errors), args.output_path)
    else:
        _say(dumps(document))
    if args.image_path is not None and sys.stdout.isatty():
        for r in results:
            _say(_summary_line(r))
        for e in errors:
            _say(f"{e.image_path}: FAILED: {e.error}")
    return len(results), len(errors)


def _refuse_writing_over_inputs(output_path: str, files: list, model_path: str | None,
                                flag: str = "--output_path", kind: str = ".json or .jsonl") -> None:
    """Refuse an output that is one of the films, the model, the shipped model, or any image or model file.

    Raises:
        OutputPathError: it would be written over such a file.
    """
    from .checkpoint import protected_checkpoint

    out = Path(output_path).expanduser()
    refuse_input_suffix(out, flag, kind)
    if not out.exists():
        return
    what = protected_checkpoint(out, model_path, "used")
    if what:
        raise OutputPathError(f"{flag} {output_path} is {what}; give a new {kind} path")
    target = out.stat()
    for f in files:
        try:
            st = os.stat(f)
        except OSError:
            continue  # unreadable inputs are reported by the prediction itself
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            raise OutputPathError(f"{flag} {output_path} is the input {f}; the output would be written over it: "
                                  f"give a new {kind} path")


def predict_main(argv: list[str] | None = None) -> int:
    """``pneumoscan predict`` / ``run_inference.py``; under torchrun the files are shared out among the ranks."""
    from .distributed import close_world, env_world, init_world

    parser = _predict_parser()
    args = parser.parse_args(argv)
    try:
        world = env_world()
    except ValueError as exc:
        parser.error(str(exc))
    configure_logging(verbose=args.verbose, quiet=not world.is_main)
    jsonl = bool(args.output_path) and args.output_path.lower().endswith(".jsonl")
    if args.resume and not jsonl:
        parser.error("--resume needs --output_path ending in .jsonl (a .json document is written only at the end)")
    if world.distributed and not args.output_path:
        parser.error("under torchrun, --output_path is needed (.jsonl or .json): the ranks' results are merged there")
    if args.decode_workers < 0 or args.batch_size < 1:
        parser.error("--decode_workers must be >= 0 and --batch_size >= 1")
    world = init_world("cpu")  # gloo: prediction only needs the ranks' count of failed shares
    code = EXIT_BAD_INPUT
    try:
        code = _predict(args, world, jsonl)
        return code
    finally:  # a rank that stopped on an error (2, or an exception) must not wait for the others
        close_world(world, clean=code in (EXIT_OK, EXIT_SOME_FAILED))


def _predict(args, world, jsonl: bool) -> int:
    if args.image_path is not None:
        try:
            found = Path(args.image_path).is_file()
        except OSError as exc:  # a name too long, a folder that cannot be searched
            log.error("image_path %r cannot be read: %s", args.image_path, exc.strerror or exc)
            return EXIT_BAD_INPUT
        if not found:
            log.error("image_path %r does not exist or is not a file", args.image_path)
            return EXIT_BAD_INPUT
    try:
        with contextlib.ExitStack() as held:
            return _predict_files(args, world, jsonl, held)
    except (PneumoscanError, ValueError, OSError) as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        if jsonl:
            log.error("interrupted; every finished file is in %s: continue with --resume", args.output_path)
        return 130


def _predict_files(args, world, jsonl: bool, held: contextlib.ExitStack) -> int:
    """``_predict``'s work; ``held`` keeps the output's lock (rank 0) until it returns."""
    import torch

    from .atomic import output_lock
    from .inference import MedicalImageInference, list_inputs

    files = [Path(args.image_path)] if args.image_path else list_inputs(args.image_dir, not args.no_recursive)
    if not files:
        raise DataError(f"no .jpg, .jpeg, .png or DICOM files found in {args.image_dir}")
    if args.output_path:  # before any image is predicted, not after; every rank (each writes beside it)
        check_writable(args.output_path)  # first: a name too long to look up is said so, not as an OSError
        _refuse_writing_over_inputs(args.output_path, files, args.model_path)
        if world.is_main:  # one run per output: a second would fold, replace or delete the first one's files
            held.enter_context(output_lock(args.output_path))
    if args.heatmap_dir:
        check_writable(args.heatmap_dir, "--heatmap_dir", folder=True)
    device = args.device
    if world.distributed and device != "cpu" and torch.cuda.is_available():
        device = f"cuda:{world.local_rank % torch.cuda.device_count()}"  # one GPU per rank
    engine = MedicalImageInference(args.model_path, device=device, threshold=args.threshold,
                                   batch_size=args.batch_size, decode_workers=args.decode_workers,
                                   backend=args.backend, calibration_dir=args.calibration_dir)
    if args.calibration_dir and engine.backend != "onnx-int8":
        log.warning("--calibration_dir is not used: it calibrates the onnx-int8 backend's int8 model, and this run "
                    "uses the %s backend%s", engine.backend,
                    " (what --backend auto chose for this model and device); give --backend onnx-int8 to build the "
                    "int8 model" if args.backend == "auto" else "")
    log.info("predicting %d file(s)", len(files))
    if world.distributed:
        _, failed = _predict_sharded(engine, files, args, world)
    else:
        _, failed = (_predict_jsonl if jsonl else _predict_document)(engine, files, args)
    return EXIT_SOME_FAILED if failed else EXIT_OK


def _add_patients_flag(p: argparse.ArgumentParser, **kwargs) -> None:
    p.add_argument("--patients", metavar="CSV", type=user_path, **{"default": "", **kwargs},
                   help="CSV with columns file,patient giving every film's patient, for patient-level splits, "
                        "folds and CIs (default: a DICOM file's PatientID, else the Kermany file-name rule, else "
                        "the file name without its extension)")


def _evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pneumoscan evaluate",
                                description="Measure a model on labelled images, with 95% CIs; on a folder "
                                            "without labels, count what the scope checks refused or flagged.")
    p.add_argument("--model_path", type=user_path, help="checkpoint to evaluate (default: the shipped model)")
    p.add_argument("--data_dir", type=user_path, required=True,
                   help="a folder with NORMAL/ and PNEUMONIA/, or a data set root (its --split is used); any other "
                        "folder gets the scope report")
    p.add_argument("--scope_report", action="store_true",
                   help="report refusals and population/lateral warnings by reason (every image under --data_dir, "
                        "labelled or not) instead of metrics")
    p.add_argument("--split", default="test", help="split under a data set root (default test)")
    _add_patients_flag(p)
    p.add_argument("--output_path", type=user_path,
                   help="write the metrics as JSON here (default: table on stdout only)")
    p.add_argument("--report", type=user_path,
                   help="write a self-contained HTML report here (curves, calibration, errors)")
    p.add_argument("--threshold", type=float, help="override the model's operating threshold")
    p.add_argument("--prevalence", type=float,
                   help="also give PPV and NPV where this share of films shows pneumonia (e.g. 0.2); those of "
                        "the evaluated films hold only at their own share")
    p.add_argument("--model_only", action="store_true",
                   help="labelled films: only the model's metrics, without also running every film through the "
                        "prediction pipeline (scope checks, risk levels) for the 'in use' counts (about half the "
                        "time)")
    p.add_argument("--backend", choices=("auto", "torch", "onnx", "onnx-int8"),
                   help="what runs the model for the 'in use' counts (default torch, as for the model-only metrics) "
                        "and the scope report (default auto: what predict and serve use, onnx-int8 on a CPU)")
    p.add_argument("--n_boot", type=int, default=1000, help="bootstrap resamples for the CIs (default 1000)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--cache_dir", type=user_path, default="", help="decoded-image cache ('none' disables)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _labelled(data_dir: str, split: str) -> bool:
    """True when ``data_dir`` holds NORMAL/ or PNEUMONIA/, a ``split`` folder, or a data set root below it."""
    from .data import find_dataset_root

    base = Path(data_dir).expanduser()
    try:
        names = {p.name.upper() for p in base.iterdir() if p.is_dir()} if base.is_dir() else None
    except OSError:  # a name too long, a folder that cannot be read
        names = None
    if names is None:
        return True  # the labelled path says what is wrong
    if names & {"NORMAL", "PNEUMONIA", split.upper()}:
        return True
    try:
        find_dataset_root(base)
    except DataError:
        return False
    return True


def _scope_report_main(args) -> int:
    """``evaluate`` on a folder without labels: refused, flagged and answered counts, by reason and sub-folder."""
    from .inference import MedicalImageInference, list_inputs
    from .results import write_json
    from .scope_report import format_scope_report, scope_report

    try:
        engine = MedicalImageInference(args.model_path, device=args.device, threshold=args.threshold,
                                       backend=args.backend or "auto")
        files = list_inputs(args.data_dir)
        if not files:
            raise DataError(f"no .jpg, .jpeg, .png or DICOM files found in {args.data_dir}")
        if args.output_path:
            _refuse_writing_over_inputs(args.output_path, files, None, kind=".json")
    except (PneumoscanError, ValueError) as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    report = scope_report(list(engine.iter_predict(files)), args.data_dir)
    report.update(model_path=engine.model_path, model_version=engine.model_version)
    _say(f"{engine.model_path} on {args.data_dir}: scope report ({len(files)} inputs; refused = no "
         f"prediction, flagged = answered with a lateral or population warning)")
    _say(format_scope_report(report))
    if args.output_path and not _written(write_json, report, args.output_path):
        return EXIT_BAD_INPUT
    return EXIT_SOME_FAILED if report["all"]["unreadable"] else EXIT_OK


def _written(write, *args, **kwargs) -> bool:
    """``write(..., path, ...)`` (the path is the last positional argument); False, logged, when it could not
    be written (checked before the work, but a disk can fill up or a folder vanish meanwhile)."""
    path = args[-1]
    try:
        write(*args, **kwargs)
    except OSError as exc:
        log.error("cannot write %s: %s", path, exc.strerror or exc)
        return False
    except UnicodeError as exc:  # text that cannot be encoded; any earlier output, and an older file, stay whole
        log.error("cannot write %s: %s; nothing was written there (the outputs before it were): please report "
                  "this with the file names of the data", path, exc)
        return False
    log.info("written to %s", path)
    return True


def _n_boot_ok(n_boot: int) -> bool:
    if n_boot >= 1:
        return True
    log.error("--n_boot %s: give at least 1 bootstrap resample (default 1000; fewer give rougher intervals)", n_boot)
    return False


# fewer patients of a class than this: the patient bootstrap has too few distinct resamples to give an interval
MIN_PATIENTS_FOR_CI = 5


def _warn_on_few_patients(labels, patients, report: dict) -> None:
    """A class with films of fewer than ``MIN_PATIENTS_FOR_CI`` patients: the intervals that depend on it (which
    resample patients) are close to meaningless, however many films; and any other interval of no width."""
    import numpy as np

    y, groups = np.asarray(labels), np.asarray(patients)
    warned = set()
    # sensitivity reads the pneumonia films alone, specificity the normal ones; every other metric reads both
    both = [name for name in report["metrics"] if name not in ("sensitivity", "specificity")]
    for label, films, metrics in ((1, "pneumonia", ("sensitivity", *both)), (0, "normal", ("specificity", *both))):
        n = len(set(groups[y == label].tolist()))
        if 0 < n < MIN_PATIENTS_FOR_CI:
            warned.update(metrics)
            log.warning("the %s films come from %d patient(s): the 95 %% intervals of %s resample patients and "
                        "cannot be trusted with fewer than %d; add films of more patients", films, n,
                        ", ".join(metrics), MIN_PATIENTS_FOR_CI)
    flat = [name for name, m in report["metrics"].items() if name not in warned and m["value"] not in (0.0, 1.0)
            and m["ci_low"] == m["ci_high"]]
    if flat:
        log.warning("%s: an interval of no width (too few films or patients to resample); read it as unknown, "
                    "not as certain", ", ".join(flat))


def _warn_on_zero_counts(report: dict) -> None:
    """A specificity (or sensitivity) of 1 on these films has a bootstrap interval of no width, which reads as
    certainty: say so, with the rule-of-three 95 % bound (1 - 3/n), and with ``--prevalence`` the PPV (or NPV)
    at that bound; the bounds go into ``report["zero_count_bounds"]`` too, so the JSON and the HTML carry them."""
    from .metrics import predictive_values

    c, m, prev = report["confusion"], report["metrics"], report.get("prevalence")
    report["zero_count_bounds"] = {}
    sens, spec = m["sensitivity"]["value"], m["specificity"]["value"]
    for errors, n, films, metric, value_name, other in (
            (c["fp"], c["tn"] + c["fp"], "normal", "specificity", "ppv", "false positive"),
            (c["fn"], c["tp"] + c["fn"], "pneumonia", "sensitivity", "npv", "false negative")):
        if errors or not n:
            continue
        bound = max(0.0, 1.0 - 3.0 / n)
        text = (f"no {other} among these {n} {films} films, so the {metric} of 1 has a bootstrap interval of no "
                f"width; its 95 % lower bound by the rule of three is {bound:.3f}")
        record = {"films": n, "lower_bound_95": bound, "rule": "rule of three (1 - 3/n)"}
        if prev is not None:
            at_bound = predictive_values(bound if metric == "sensitivity" else sens,
                                         bound if metric == "specificity" else spec, prev)
            value = at_bound[0 if value_name == "ppv" else 1]
            text += (f", and there the {value_name.upper()} at {100 * prev:g}% would be {value:.4f} "
                     f"(not {m[value_name + '_at_prevalence']['value']:.4f})")
            record[f"{value_name}_at_prevalence_at_bound"] = value
        report["zero_count_bounds"][metric] = record
        log.warning("%s", text)


def evaluate_main(argv: list[str] | None = None) -> int:
    """``pneumoscan evaluate``: metrics table on stdout, JSON to ``--output_path``."""
    from .checkpoint import default_model_path, load_checkpoint
    from .data import load_labelled_folder
    from .evaluate import evaluate_imageset
    from .inference import MedicalImageInference
    from .metrics import check_prevalence, format_metrics_table
    from .predict import Predictor, resolve_device
    from .results import write_json
    from .scope_report import format_in_use, in_use_report
    from .site_calibration import stored_target

    args = _evaluate_parser().parse_args(argv)
    configure_logging(verbose=args.verbose)
    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        log.error("--threshold %s: give a probability between 0 and 1 (the checkpoint's own is used without it)",
                  args.threshold)
        return EXIT_BAD_INPUT
    if not _n_boot_ok(args.n_boot):
        return EXIT_BAD_INPUT
    try:
        if args.prevalence is not None:
            check_prevalence(args.prevalence, "--prevalence")
        outputs = {flag: (path, kind) for flag, path, kind in (("--output_path", args.output_path, ".json"),
                                                                ("--report", args.report, ".html")) if path}
        for flag, (path, kind) in outputs.items():  # before any film is read, not after
            _refuse_writing_over_inputs(path, [], args.model_path, flag, kind)
            check_writable(path, flag)
        if len(outputs) == 2 and same_file(args.output_path, args.report):
            raise OutputPathError(f"--output_path and --report are one file ({args.report}): the report would "
                                  f"replace the JSON; give two paths")
    except ValueError as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    if args.scope_report or not _labelled(args.data_dir, args.split):
        for flag, given in (("--prevalence", args.prevalence is not None), ("--report", bool(args.report))):
            if given:
                log.warning("%s is for labelled films (NORMAL/ and PNEUMONIA/): ignored in this scope report", flag)
        return _scope_report_main(args)
    try:
        args.model_path = args.model_path or str(default_model_path())
        ckpt = load_checkpoint(args.model_path)
        predictor = Predictor.from_checkpoint(ckpt, resolve_device(args.device))
        threshold = ckpt.get("threshold", 0.5) if args.threshold is None else args.threshold
        data, bad = load_labelled_folder(args.data_dir, predictor.spec.image_size, args.split, args.cache_dir,
                                         args.patients)
        for flag, (path, kind) in outputs.items():  # a film without a suffix (DICOM) among the inputs
            _refuse_writing_over_inputs(path, [*data.paths, *(p for p, _ in bad)], None, flag, kind)
        report, prob = evaluate_imageset(predictor, data, threshold, args.n_boot, args.prevalence)
        if not args.model_only:  # every film through the pipeline a prediction takes, scope checks included
            engine = MedicalImageInference(args.model_path, device=args.device, threshold=args.threshold,
                                           backend=args.backend or "torch")
            try:
                report["in_use"] = in_use_report(list(engine.iter_predict(data.paths)), data.labels.numpy())
            finally:
                engine.close()
            report["in_use"]["backend"] = engine.backend
    except (PneumoscanError, ValueError) as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    report.update({"model_path": args.model_path, "model_version": ckpt.get("model_version"),
                   "data_dir": args.data_dir, "stored_threshold": ckpt.get("threshold", 0.5),
                   "threshold_given": args.threshold is not None,
                   "skipped_files": [{"path": p, "reason": r} for p, r in bad]})
    _warn_on_zero_counts(report)
    _warn_on_few_patients(data.labels.numpy(), data.patients, report)
    target = stored_target(ckpt)
    sens = report["metrics"]["sensitivity"]
    if args.threshold is None and sens["ci_high"] < target:
        log.warning("sensitivity at the stored threshold on these films is %.3f [%.3f, %.3f], below the %.2f it was "
                    "fitted for: the operating point does not hold here; `pneumoscan calibrate` refits it on "
                    "labelled local films", sens["value"], sens["ci_low"], sens["ci_high"], target)
    cal = "calibrated" if report["calibrated"] else "uncalibrated (checkpoint has no temperature)"
    _say(f"{args.model_path} on {args.data_dir} ({len(data)} films of {report['patients']} patients; "
         f"CIs resample patients): {cal}, ECE(15 bins) {report['ece_15']:.4f}")
    _say(format_metrics_table(report))
    if "in_use" in report:
        _say(format_in_use(report["in_use"]))
    if bad:  # in the table's output too, not only in the log: these films are in none of the numbers above
        from collections import Counter

        from .data import left_out_kind

        counts = Counter(left_out_kind(r) for _, r in bad)
        kinds = ", ".join(f"{counts[k]} {k}" for k in sorted(counts, key=lambda k: (-counts[k], k)))
        names = ", ".join(Path(p).name for p, _ in bad[:5]) + (", ..." if len(bad) > 5 else "")
        _say(f"left out: {len(bad)} file(s), in none of the numbers above ({kinds}: {names}; each with its reason "
             f"in the JSON's skipped_files)")
    if args.output_path and not _written(write_json, report, args.output_path):
        return EXIT_BAD_INPUT
    if args.report:
        from .report import build_report

        # heatmaps only: Grad-CAM runs the fp32 weights, so no int8 graph is built for it
        engine = MedicalImageInference(args.model_path, device=args.device, gate=False, backend="torch")
        if not _written(build_report, report, data.labels.numpy(), prob, data.paths, args.report,
                        heatmap=engine.heatmap_data_uri):
            return EXIT_BAD_INPUT
    return _left_out_status(bad)


def _left_out_status(bad: list[tuple[str, str]]) -> int:
    """The exit status of a run that left ``bad`` out: 1 where a file failed, not for copies counted once."""
    from .data import left_out_kind

    return EXIT_SOME_FAILED if any(left_out_kind(r) != "duplicate" for _, r in bad) else EXIT_OK


def _calibrate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pneumoscan calibrate",
        description="Refit a model's temperature and operating threshold on a site's own labelled films and write "
                    "a new checkpoint (same weights); prints the stored operating point on those films and what "
                    "the refitted one does on new films of the site (cross-validated by patient).")
    p.add_argument("--model_path", type=user_path,
                   help="checkpoint to calibrate (default: the shipped model); it is not changed")
    p.add_argument("--data_dir", type=user_path, required=True,
                   help="labelled films of the site: a folder with NORMAL/ and PNEUMONIA/, or a data set root")
    p.add_argument("--split", default="test", help="split under a data set root (default test)")
    _add_patients_flag(p)
    p.add_argument("--output_path", type=user_path, required=True,
                   help="the site-calibrated checkpoint to write (a new file)")
    p.add_argument("--site", default="site", help="short site name, appended to the model version (default site)")
    p.add_argument("--target_sensitivity", type=float,
                   help="sensitivity the new threshold must keep on the site's films (default: the checkpoint's)")
    p.add_argument("--folds", type=int, default=5, help="patient groups for the cross-validated estimate (default 5)")
    p.add_argument("--min_per_class", type=int, default=50, help="fewest films of each class accepted (default 50)")
    p.add_argument("--intercept", action="store_true",
                   help="fit a logistic calibration (temperature and intercept) instead of a temperature alone, "
                        "from films of at least 300 patients: on the site's next patients its probabilities are "
                        "better calibrated, but where films later change its errors are more confident ones "
                        "(docs/experiments.md, 'An intercept for a site'); watch the site with pneumoscan audit "
                        "--summary")
    p.add_argument("--refit_gate", action="store_true",
                   help="also raise the feature-distance gate's limit to the same quantile of these films, for a "
                        "site whose processing makes the gate refuse valid films (never lowered; the scope "
                        "classifier is unchanged; what it costs on out-of-scope inputs: docs/gate.md)")
    p.add_argument("--json", type=user_path, help="write the report (both operating points, with CIs) here")
    p.add_argument("--n_boot", type=int, default=1000, help="bootstrap resamples for the CIs (default 1000)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--cache_dir", type=user_path, default="", help="decoded-image cache ('none' disables)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def calibrate_main(argv: list[str] | None = None) -> int:
    """``pneumoscan calibrate``: a site-calibrated copy of a checkpoint, and the table of what changed."""
    from .checkpoint import check_output_path, default_model_path, load_checkpoint, save_checkpoint
    from .data import load_labelled_folder
    from .predict import Predictor, resolve_device
    from .results import write_json
    from .site_calibration import SiteCalibrationConfig, calibrate_on_site, format_site_report

    args = _calibrate_parser().parse_args(argv)
    configure_logging(verbose=args.verbose)
    if not _n_boot_ok(args.n_boot):
        return EXIT_BAD_INPUT
    try:
        cfg = SiteCalibrationConfig(site=args.site, target_sensitivity=args.target_sensitivity, folds=args.folds,
                                    min_per_class=args.min_per_class, n_boot=args.n_boot, refit_gate=args.refit_gate,
                                    intercept=args.intercept)
        args.model_path = args.model_path or str(default_model_path())
        out = check_output_path(args.model_path, args.output_path)
        if args.json:
            report_path = check_output_path(args.model_path, args.json, "--json", new_file=False)
            if same_file(report_path, out):
                raise DataError(f"--json {args.json} is --output_path; give the report its own file")
            refuse_input_suffix(args.json, "--json", ".json")  # another checkpoint, a film
        ckpt = load_checkpoint(args.model_path)
        predictor = Predictor.from_checkpoint(ckpt, resolve_device(args.device))
        data, bad = load_labelled_folder(args.data_dir, predictor.spec.image_size, args.split, args.cache_dir,
                                         args.patients)
        new, record = calibrate_on_site(ckpt, predictor, data, cfg)
    except (PneumoscanError, ValueError) as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    try:
        save_checkpoint(new, out, exclusive=True)
    except FileExistsError:
        log.error("%s was created by something else while the site was calibrated; it is left as it was and "
                  "nothing was written: run again with a new --output_path", out)
        return EXIT_BAD_INPUT
    except OSError as exc:
        log.error("could not write the site-calibrated checkpoint %s (%s); nothing was written", out, exc)
        return EXIT_BAD_INPUT
    _say(format_site_report(record))
    _say(f"wrote {args.output_path} (model version {new['model_version']}); use it with --model_path")
    if args.json:
        record.update(data_dir=args.data_dir, model_path=args.model_path,  # in the report, not in the checkpoint
                      skipped_files=[{"path": p, "reason": r} for p, r in bad])
        try:
            write_json(record, args.json)
        except OSError as exc:
            log.error("the site checkpoint %s was written, but not the report %s (%s)", out, args.json, exc)
            return EXIT_SOME_FAILED
        log.info("report written to %s", args.json)
    if bad:
        log.warning("%d file(s) were left out (unreadable, not frontal or copies; listed in the report)", len(bad))
    return _left_out_status(bad)


# Commands living in their own modules are imported only when run, so that e.g. ``predict``
# never imports the web service's dependencies.
COMMANDS = {"train": train_main, "predict": predict_main, "evaluate": evaluate_main, "calibrate": calibrate_main,
            "ensemble": "pneumoscan.ensemble:ensemble_main", "export": "pneumoscan.export:export_main",
            "serve": "pneumoscan.serve.cli:serve_main", "audit": "pneumoscan.serve.cli:audit_main"}
EXTRAS = {"export": "onnx", "serve": "serve", "audit": "serve"}


def _command(name: str):
    target = COMMANDS[name]
    if callable(target):
        return target
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def main(argv: list[str] | None = None) -> int:
    """``pneumoscan <command> [flags]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            sys.stderr.write(f"pneumoscan: unknown command {argv[0]!r}\n")
        sys.stderr.write(f"usage: pneumoscan {{{','.join(COMMANDS)}}} [flags]\n"
                         "       pneumoscan <command> --help for its flags\n")
        return EXIT_OK if argv and argv[0] in ("-h", "--help") else EXIT_BAD_INPUT
    try:
        command = _command(argv[0])
    except ModuleNotFoundError as exc:
        sys.stderr.write(f"pneumoscan {argv[0]} needs a package that is not installed ({exc.name}); "
                         f"install the extra: pip install 'pneumoscan[{EXTRAS.get(argv[0], 'dev')}]'\n")
        return EXIT_BAD_INPUT
    return command(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
