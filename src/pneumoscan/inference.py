"""Prediction on single images and folders: ``MedicalImageInference`` and its result types.

One ``MedicalImageInference`` holds a model for its lifetime (a service keeps one);
every image goes through the same preprocessing as training, read from the
checkpoint. One bad file yields an ``InferenceFailure`` and never stops a batch.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .checkpoint import default_model_path, load_checkpoint
from .errors import CheckpointError, DataError, ImageError, InferenceError, OutOfScopeError
from .gate import OutOfScopeGate
from .heatmap import overlay_png
from .predict import Predictor, resolve_device
from .preprocess import DecodedImage, FolderVisits, decode_image, is_input_file
from .scope import ScopeClassifier

log = logging.getLogger(__name__)

RISK_LOW, RISK_MEDIUM, RISK_HIGH = "LOW", "MEDIUM", "HIGH"
# A result carrying one of these warnings was made outside what the model is validated on: its
# confidence says nothing about how right it is, so its risk level is HIGH, never LOW (docs/scope.md).
VIEW_WARNINGS = ("lateral", "not frontal")
POPULATION_WARNINGS = ("outside the validated population",)
UNVALIDATED_WARNINGS = VIEW_WARNINGS + POPULATION_WARNINGS


def unvalidated_kind(warnings: list) -> str | None:
    """Which of ``UNVALIDATED_WARNINGS`` an answer carries: "view" (checked first), "population", or None."""
    texts = [str(w).lower() for w in warnings]
    for kind, markers in (("view", VIEW_WARNINGS), ("population", POPULATION_WARNINGS)):
        if any(marker in text for text in texts for marker in markers):
            return kind
    return None
# An answered film whose fine detail is below the training films' (``OutOfScopeGate.low_detail``); it keeps the
# answer from risk LOW (MEDIUM instead) but forces nothing more: on validation films taken down to 25 %, AUROC
# held (docs/gate.md, "Detail check").
LOW_DETAIL_PREFIX = "low detail: "
LOW_DETAIL = LOW_DETAIL_PREFIX + "{}; the answer may be less reliable: if possible, send the original film"


def has_low_detail_warning(warnings: list) -> bool:
    """Whether an answer's warnings include the low-detail one (``evaluate``'s in-use count, the drift check)."""
    return any(str(w).startswith(LOW_DETAIL_PREFIX) for w in warnings)


# ... and on a refused one, whose lost detail the scope checks may have read as an adult's or another film
LOW_DETAIL_NOTE_PREFIX = "; note: the image has "
LOW_DETAIL_NOTE = (LOW_DETAIL_NOTE_PREFIX + "{}, which the checks above can mistake for another kind of film: if "
                   "this is a child's frontal chest film, send the original")


@dataclass
class InferenceResult:
    """One prediction. The first seven fields are the seed's; the rest say how it was made."""

    prediction: str
    confidence: float
    probabilities: dict[str, float]
    risk_level: str
    uncertainty: float
    processing_time: float
    timestamp: str
    image_path: str | None = None
    threshold: float = 0.5
    calibrated: bool = False
    model_version: str = ""
    view_position: str | None = None
    warnings: list[str] = field(default_factory=list)
    heatmap_path: str | None = None
    backend: str = "torch"


@dataclass
class InferenceFailure:
    """An input that produced no prediction, and why (``error_type`` OutOfScopeError: refused by the gate)."""

    image_path: str
    error: str
    error_type: str
    timestamp: str = field(default_factory=lambda: datetime.now().astimezone().isoformat())


def normalized_entropy(probs: list[float] | torch.Tensor) -> float:
    """Shannon entropy of ``probs`` divided by ln(K): 0 for certainty, 1 for a uniform guess."""
    p = torch.as_tensor(probs, dtype=torch.float64)
    entropy = -torch.special.xlogy(p, p).sum()
    return max(0.0, float(entropy / math.log(len(p))))  # never -0.0 (a certain answer) in the JSON


def risk_level(confidence: float, uncertainty: float) -> str:
    """The seed's rule: LOW if confidence > 0.8 and uncertainty < 0.3; MEDIUM if > 0.6 and < 0.5; else HIGH."""
    if confidence > 0.8 and uncertainty < 0.3:
        return RISK_LOW
    if confidence > 0.6 and uncertainty < 0.5:
        return RISK_MEDIUM
    return RISK_HIGH


def iter_inputs(directory: str | os.PathLike, recursive: bool = True) -> Iterator[Path]:
    """Image and DICOM files under ``directory``, depth first, each folder's entries sorted by name.

    Hidden files and folders and ``__MACOSX`` are skipped; links to folders are followed, each real folder
    once (a loop is not); broken links and special files with an image name are yielded (prediction
    reports them). A folder that cannot be listed is logged. Memory is that of the largest single folder.

    Raises:
        DataError: ``directory`` does not exist or is not a folder.
    """
    base = Path(directory)
    if not base.is_dir():
        raise DataError(f"image_dir {str(base)!r} does not exist or is not a folder")
    skipped = 0
    visits = FolderVisits(base)  # links to folders are followed, each real folder once (no cycles)

    def walk(folder: Path) -> Iterator[Path]:
        nonlocal skipped
        try:
            with os.scandir(folder) as it:
                entries = sorted((e.name, e.is_dir()) for e in it)
        except OSError as exc:
            log.warning("cannot list %s (%s); its files are not predicted", folder, exc.strerror or exc)
            return
        for name, is_dir in entries:
            path = folder / name
            if is_dir:
                if recursive and not name.startswith(".") and name.lower() != "__macosx" and visits.first(path):
                    yield from walk(path)
            elif is_input_file(path):
                yield path
            elif not name.startswith("."):
                skipped += 1

    yield from walk(base)
    if skipped:
        log.warning("%s: skipped %d file(s) that are neither JPEG/PNG nor DICOM", base, skipped)


def list_inputs(directory: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """``iter_inputs`` as a list."""
    return list(iter_inputs(directory, recursive))


def _name(source) -> str:
    return "<bytes>" if isinstance(source, bytes) else str(source)


def _failure(name: str, exc: Exception) -> InferenceFailure:
    log.warning("%s", exc)
    return InferenceFailure(name, str(exc), type(exc).__name__)


@dataclass
class _Prepared:
    """One input after decoding and the pixel checks, ready for the forward pass."""

    index: int
    source: object  # the path or bytes, for names and heatmaps
    pixels: np.ndarray | None = None
    decoded: DecodedImage | None = None
    seconds: float = 0.0
    failure: InferenceFailure | None = None


def heatmap_name(source: str | os.PathLike | bytes) -> str:
    """The heatmap file name of an input: its stem and 10 hex digits of the sha256 of its absolute path (of the
    bytes, for an upload), so that films of one name in two folders never share a heatmap, and a film keeps its
    name across runs, ``--resume`` and torchrun ranks."""
    if isinstance(source, bytes):
        return f"bytes_{hashlib.sha256(source).hexdigest()[:10]}_heatmap.png"
    path = Path(source).expanduser().resolve()
    # a long stem is cut (the hash keeps names apart): the name and atomic_path's temporary one stay under NAME_MAX
    stem = os.fsdecode(os.fsencode(path.stem)[:HEATMAP_STEM_BYTES])
    return f"{stem}_{hashlib.sha256(os.fsencode(path)).hexdigest()[:10]}_heatmap.png"


HEATMAP_STEM_BYTES = 160  # + 23 for the hash and suffix + about 30 for a temporary name: under 255


def drop_stale_heatmap(source, heatmap_dir: str | os.PathLike | None) -> None:
    """Remove the heatmap an earlier run wrote under this film's name: a film refused, unreadable or whose
    heatmap cannot be written now must not keep an overlay that reads as evidence."""
    if heatmap_dir is None or isinstance(source, bytes):
        return
    try:
        (Path(heatmap_dir) / heatmap_name(source)).unlink(missing_ok=True)
    except OSError as exc:
        log.warning("%s: an earlier heatmap of this film could not be removed (%s)", _name(source), exc)


class MedicalImageInference:
    """A loaded model that predicts on images.

    Args:
        model_path: a checkpoint written by ``pneumoscan train``; None uses the shipped model.
        device: ``auto``, ``cpu`` or ``cuda``.
        threshold: overrides the checkpoint's operating threshold on P(PNEUMONIA).
        batch_size: images per forward pass in folder prediction.
        gate: refuse out-of-scope inputs when the checkpoint has a gate (default True).
        decode_workers: threads decoding the next images while the model runs (0: decode in line).
        backend: what runs the model: ``auto`` (default: ``onnx-int8`` on the CPU when onnxruntime is
            installed and the checkpoint carries its int8 calibration, else ``torch``), ``torch`` (the
            fp32 reference), ``onnx`` or ``onnx-int8`` (ONNX Runtime; see ``backends.py``).
        calibration_dir: for ``onnx-int8`` when its int8 model is not cached yet: the data set the
            model was trained on.

    Raises:
        CheckpointError: the checkpoint is missing or not a usable pneumoscan checkpoint.
        ValueError: an unknown backend, or one that cannot run on ``device``.
    """

    def __init__(self, model_path: str | os.PathLike | None = None, device: str = "auto",
                 threshold: float | None = None, batch_size: int = 16, gate: bool = True,
                 decode_workers: int = 2, backend: str = "auto",
                 calibration_dir: str | os.PathLike | None = None) -> None:
        if model_path is None:
            model_path = default_model_path()
        if threshold is not None and not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_path = str(model_path)
        self.checkpoint = load_checkpoint(model_path)
        if backend == "torch":
            self.predictor = Predictor.from_checkpoint(self.checkpoint, resolve_device(device))
        else:
            from .backends import make_predictor, resolve_backend  # onnxruntime is imported only if used

            backend = resolve_backend(self.checkpoint, device, backend)
            self.predictor = make_predictor(self.checkpoint, device, backend, calibration_dir=calibration_dir)
        self.backend = backend
        self.class_names = list(self.checkpoint["class_names"])
        self.threshold = float(self.checkpoint.get("threshold", 0.5) if threshold is None else threshold)
        self.batch_size = batch_size
        self.decode_workers = max(0, int(decode_workers))
        self._pool: ThreadPoolExecutor | None = None
        self.model_version = self.checkpoint.get("model_version") or Path(model_path).stem
        gate_state = self.checkpoint.get("ood_gate")
        try:
            self.gate = OutOfScopeGate.from_dict(gate_state) if gate and gate_state else None
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{model_path}: unusable out-of-scope gate ({exc})") from exc
        if self.temperature is None:
            log.warning("%s has no calibration: probabilities are uncalibrated softmax outputs", model_path)
        if gate and gate_state is None:
            log.warning("%s has no out-of-scope gate: non-radiographs will get predictions", model_path)
        scope_state = self.checkpoint.get("scope_classifier")
        try:
            self.scope = ScopeClassifier.from_dict(scope_state) if gate and scope_state else None
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{model_path}: unusable scope classifier ({exc})") from exc
        if self.scope is not None and not self.scope.fits(self.checkpoint["model_state"]):
            raise CheckpointError(f"{model_path}: its scope classifier was fitted on another model's features; "
                                  f"refit it with experiments/fit_scope.py")
        if self.gate is not None and self.gate.min_detail is None:
            log.warning("%s has no detail floor in its gate: downscaled or blurred copies of films get no low-detail "
                        "warning (experiments/gate_detail.py --store adds it)", model_path)
        if gate and gate_state is not None and scope_state is None:
            log.warning("%s has no scope classifier: lateral views, other body parts and adult films will get "
                        "predictions", model_path)

    @property
    def model(self) -> torch.nn.Module:
        return self.predictor.model

    @property
    def device(self) -> torch.device:
        return self.predictor.device

    @property
    def image_size(self) -> int:
        return self.predictor.spec.image_size

    @property
    def temperature(self) -> float | None:
        return self.predictor.temperature

    @property
    def info(self) -> dict:
        """What produced the predictions, for result files and audit logs."""
        return {"model_path": self.model_path, "model_version": self.model_version,
                "arch": self.checkpoint.get("arch"), "image_size": self.image_size,
                "intensity": self.predictor.spec.intensity,
                "threshold": self.threshold, "temperature": self.temperature,
                "calibration_bias": getattr(self.predictor, "bias", 0.0),
                "calibrated": self.temperature is not None, "class_names": self.class_names,
                "out_of_scope_gate": self.gate is not None, "scope_classifier": self.scope is not None,
                "detail_check": self.gate is not None and self.gate.min_detail is not None,
                "backend": self.backend}

    def _result(self, probs: torch.Tensor, seconds: float, path: str | None,
                decoded: DecodedImage, image_warnings: list[str] | None = None) -> InferenceResult:
        p_pos = float(probs[1])
        label = 1 if p_pos >= self.threshold else 0
        confidence = float(probs[label])
        uncertainty = normalized_entropy(probs)
        warnings, view = [], None
        if decoded.dicom is not None:
            view = decoded.dicom.view_position or None
            warnings += list(decoded.dicom.warnings)  # a lateral or other non-frontal view's warning among them
        warnings += image_warnings or []
        if self.temperature is None:
            warnings.append("uncalibrated model: probabilities are raw softmax outputs")
        level = risk_level(confidence, uncertainty)
        if unvalidated_kind(warnings):
            level = RISK_HIGH
        elif level == RISK_LOW and has_low_detail_warning(warnings):
            level = RISK_MEDIUM  # a downscaled or blurred copy: never "very confident" (docs/gate.md)
        return InferenceResult(
            prediction=self.class_names[label],
            confidence=confidence,
            probabilities={name: float(probs[i]) for i, name in enumerate(self.class_names)},
            risk_level=level,
            uncertainty=uncertainty,
            processing_time=seconds,
            timestamp=datetime.now().astimezone().isoformat(),
            image_path=path,
            threshold=self.threshold,
            calibrated=self.temperature is not None,
            model_version=self.model_version,
            backend=self.backend,
            view_position=view,
            warnings=warnings,
        )

    def model_input(self, decoded: DecodedImage) -> torch.Tensor:
        """The uint8 (S, S) array the model sees for a decoded image."""
        return torch.from_numpy(self.predictor.spec.pixels(decoded.gray))

    def predict_image(self, source: str | os.PathLike | bytes, heatmap_dir: str | os.PathLike | None = None
                      ) -> InferenceResult:
        """Predict one image (path or encoded bytes).

        Raises:
            ImageError: the input cannot be read or decoded.
            OutOfScopeError: the input is not a chest radiograph (the gate refused it).
            InferenceError: no answer for a reason that is not the input's (a non-finite model output).
        """
        outcome = self.predict_batch([source], heatmap_dir)[0]
        if isinstance(outcome, InferenceFailure):
            exc = {OutOfScopeError.__name__: OutOfScopeError,
                   InferenceError.__name__: InferenceError}.get(outcome.error_type, ImageError)
            raise exc(outcome.error)
        return outcome

    def predict_batch(self, paths: list[str | os.PathLike | bytes], heatmap_dir: str | os.PathLike | None = None
                      ) -> list[InferenceResult | InferenceFailure]:
        """Predict many files (or encoded bytes), in order; a file that fails becomes an ``InferenceFailure``."""
        return list(self.iter_predict(paths, heatmap_dir))

    def _prepare(self, index: int, source) -> _Prepared:
        """Decode, run the pixel checks and make the model input (runs in a decode thread)."""
        t0 = time.perf_counter()
        name = _name(source)
        try:
            decoded = decode_image(source, self.image_size)
        except ImageError as exc:
            return _Prepared(index, source, failure=_failure(name, exc))
        except Exception as exc:  # an unforeseen decoder failure must not stop the batch
            log.debug("unexpected error decoding %s", name, exc_info=True)
            return _Prepared(index, source, failure=_failure(name, ImageError(
                f"{name}: unexpected error while decoding ({type(exc).__name__}: {exc})")))
        try:
            if self.gate is not None:
                verdict = self.gate.check_pixels(np.asarray(decoded.gray), decoded.colorfulness, decoded.size)
                if not verdict.in_scope:
                    return _Prepared(index, source,
                                     failure=_failure(name, OutOfScopeError(f"{name}: {verdict.reason}")))
            pixels = self.predictor.spec.pixels(decoded.gray)
        except Exception as exc:  # e.g. out of memory, a bug: this file fails, the batch goes on
            log.warning("unexpected error preparing %s", name, exc_info=True)
            return _Prepared(index, source, failure=_failure(name, InferenceError(
                f"{name}: unexpected error while preparing the image ({type(exc).__name__}: {exc}); not the file's "
                f"fault as far as is known: try it again, and report it if it stays")))
        return _Prepared(index, source, pixels, decoded, time.perf_counter() - t0)

    def _prepared(self, sources: Iterable) -> Iterator[_Prepared]:
        """``_prepare`` of each source, in order; with decode workers, a bounded number run ahead."""
        if self.decode_workers == 0:
            for i, source in enumerate(sources):
                yield self._prepare(i, source)
            return
        ahead = max(2 * self.batch_size, 2 * self.decode_workers)
        if self._pool is None:  # one pool for the engine's lifetime: a service calls this per micro-batch
            self._pool = ThreadPoolExecutor(self.decode_workers, thread_name_prefix="pneumoscan-decode")
        queue: deque[Future] = deque()
        for i, source in enumerate(sources):
            queue.append(self._pool.submit(self._prepare, i, source))
            if len(queue) >= ahead:
                yield queue.popleft().result()
        while queue:
            yield queue.popleft().result()

    def close(self) -> None:
        """Stop the decode threads (they also end with the process)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def iter_predict(self, sources: Iterable[str | os.PathLike | bytes],
                     heatmap_dir: str | os.PathLike | None = None) -> Iterator[InferenceResult | InferenceFailure]:
        """Predict each source (path or encoded bytes) and yield its outcome, in input order, as batches finish.

        Memory stays bounded however many sources there are: images are decoded a little
        ahead of the model (``decode_workers`` threads) and never accumulated.
        """
        pending: list[_Prepared] = []
        done: dict[int, InferenceResult | InferenceFailure] = {}
        next_out = 0

        def flush() -> None:
            if not pending:
                return
            t0 = time.perf_counter()
            images = torch.from_numpy(np.stack([p.pixels for p in pending]))
            out = self.predictor.outputs(images, features=self.gate is not None or self.scope is not None,
                                         batch_size=len(pending))
            probs = self.predictor.probabilities(out.logits)
            finite = torch.isfinite(out.logits).all(dim=1).tolist()  # NaN or inf: no probability can be trusted
            verdicts = self.gate.check_features(out.features) if self.gate is not None else [None] * len(pending)
            scoped = self.scope.check(out.features, images) if self.scope is not None else [None] * len(pending)
            details = self.gate.low_detail(images) if self.gate is not None else [""] * len(pending)
            share = (time.perf_counter() - t0) / len(pending)
            for prep, row, ok, verdict, scope, detail in zip(pending, probs, finite, verdicts, scoped, details):
                source = prep.source
                name = _name(source)
                if not ok:
                    done[prep.index] = _failure(name, InferenceError(
                        f"{name}: the model's output for this film is not finite (NaN or infinity), so no answer is "
                        f"given; the model file or the backend is faulty (try --backend torch) and should be "
                        f"reported"))
                    drop_stale_heatmap(source, heatmap_dir)
                    continue
                # lost detail is what the checks may have read (a downscaled child's film looks like an adult's)
                lost = LOW_DETAIL_NOTE.format(detail) if detail else ""
                # the classifier's reason names what the input looks like: prefer it to the distance's
                refusal = (f"out of scope: {scope.reason}" if scope is not None and not scope.in_scope
                           else verdict.reason if verdict is not None and not verdict.in_scope else None)
                if refusal is not None:
                    done[prep.index] = _failure(name, OutOfScopeError(f"{name}: {refusal}{lost}"))
                    drop_stale_heatmap(source, heatmap_dir)
                    continue
                result = self._result(row, prep.seconds + share, None if isinstance(source, bytes) else name,
                                      prep.decoded, [LOW_DETAIL.format(detail)] if detail else [])
                if heatmap_dir is not None:
                    self._write_heatmap(result, source, prep.decoded, Path(heatmap_dir))
                done[prep.index] = result
            pending.clear()

        def ready() -> Iterator[InferenceResult | InferenceFailure]:
            nonlocal next_out
            while next_out in done:
                yield done.pop(next_out)
                next_out += 1

        for item in self._prepared(sources):
            if item.failure is not None:
                done[item.index] = item.failure
                drop_stale_heatmap(item.source, heatmap_dir)
            else:
                pending.append(item)
                if len(pending) >= self.batch_size:
                    flush()
            yield from ready()
        flush()
        yield from ready()

    def gradcam(self, decoded: DecodedImage, target_class: int = 1) -> np.ndarray:
        """Grad-CAM (model-input grid, values in [0, 1]) of ``target_class`` for a decoded image."""
        return self.predictor.gradcam(self.model_input(decoded), target_class)

    def _overlay(self, source, decoded: DecodedImage, target_class: int, path: Path) -> None:
        cam = self.gradcam(decoded, target_class)
        # JPEGs were decoded at reduced scale (draft); the overlay is drawn on the full-size original
        gray = decoded.gray if decoded.dicom is not None else decode_image(source).gray
        overlay_png(gray, cam, path)

    def _write_heatmap(self, result: InferenceResult, source, decoded: DecodedImage, heatmap_dir: Path) -> None:
        path = heatmap_dir / heatmap_name(source)
        try:
            self._overlay(source, decoded, self.class_names.index(result.prediction), path)
        except Exception as exc:  # an unwritable folder, an odd image, memory: the answer stands, the batch goes on
            result.warnings.append(f"heatmap not written: {exc}")
            log.warning("%s: heatmap not written (%s)", result.image_path, exc,
                        exc_info=not isinstance(exc, (OSError, ValueError, ImageError)))
            drop_stale_heatmap(source, heatmap_dir)
            return
        result.heatmap_path = str(path)

    def heatmap_data_uri(self, source: str | os.PathLike | bytes, target_class: int = 1,
                         max_side: int = 400) -> str | None:
        """A PNG data URI of the Grad-CAM overlay of a file or encoded bytes (for reports and the service);
        None when the image cannot be decoded. The log names a file, never the bytes of an upload."""
        import base64
        import tempfile

        try:
            decoded = decode_image(source, self.image_size)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "h.png"
                self._overlay(source, decoded, target_class, path)
                img = Image.open(path)
                img.thumbnail((max_side, max_side))
                buf = io.BytesIO()
                img.save(buf, format="PNG")
        except (OSError, ValueError, ImageError) as exc:
            log.warning("%s: no heatmap (%s)", _name(source), exc)
            return None
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    def predict_directory(self, directory: str | os.PathLike, recursive: bool = True,
                          heatmap_dir: str | os.PathLike | None = None) -> list[InferenceResult | InferenceFailure]:
        """Predict every image and DICOM file under ``directory``.

        Raises:
            DataError: the folder does not exist or holds no image files.
        """
        files = list_inputs(directory, recursive)
        if not files:
            raise DataError(f"no .jpg, .jpeg, .png or DICOM files found in {directory}")
        log.info("predicting %d file(s) from %s", len(files), directory)
        return self.predict_batch(files, heatmap_dir)
