"""Model backends behind one interface: the torch ``Predictor`` and ONNX Runtime (float32 or int8).

``make_predictor(ckpt, device, backend)`` returns an object with ``Predictor``'s interface
(``spec``, ``temperature``, ``device``, ``model``, ``outputs()``, ``logits()``, ``probabilities()``,
``gradcam()``), so inference, evaluation and the service do not care which runs the model:

- ``torch``: ``predict.Predictor``, the reference (CPU or CUDA);
- ``onnx``: the same float32 graph in ONNX Runtime, exported in memory at load (about 1 s);
- ``onnx-int8``: static int8 quantisation of that graph (``export.quantize_int8``). Calibrating
  takes tens of seconds, so the int8 model is cached under ``~/.cache/pneumoscan/onnx``, keyed by
  the sha256 of the checkpoint's weights and the quantisation recipe; building it the first time
  needs the data set the model was trained on (``calibration_dir``).

Probabilities always come from ``calibration.calibrated_probs`` with the checkpoint's temperature,
and Grad-CAM always from the torch model (built on first use), whatever the backend.
onnxruntime is imported only when an ONNX backend is made.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_path
from .calibration import calibrated_probs
from .checkpoint import input_spec
from .errors import DataError
from .export import (
    GRAPH_INPUT,
    INT8_RECIPE,
    LOGITS,
    OnnxUnavailableError,
    feature_outputs,
    int8_ranges,
    onnx_model,
    quantize_int8,
    read_metadata,
    require,
    stale_calibration,
    stored_ranges,
    weights_digest,
)
from .predict import InputSpec, Outputs, Predictor, calibration_bias, resolve_device

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx", "onnx-int8")


class OnnxPredictor:
    """A graph from ``export.onnx_model`` (or its int8 copy) in ONNX Runtime, with ``Predictor``'s interface.

    Args:
        model: the ONNX model, as serialised bytes or a file path.
        ckpt: the checkpoint it was exported from (input spec, temperature; the torch model for Grad-CAM).
        num_threads: ONNX Runtime intra-op threads (default: torch's thread count).
        providers: ONNX Runtime execution providers, names or (name, options) pairs (default: the CPU);
            ``onnx_providers`` makes them for a device.
    """

    def __init__(self, model: bytes | str | os.PathLike, ckpt: dict, num_threads: int | None = None,
                 providers: list[str] | None = None) -> None:
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = num_threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        providers = providers or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                            providers=providers)
        self.spec: InputSpec = input_spec(ckpt)
        self.temperature: float | None = ckpt.get("temperature")
        self.bias = calibration_bias(ckpt)
        first, options = (providers[0], {}) if isinstance(providers[0], str) else providers[0]
        self.device = (torch.device("cuda", int(options.get("device_id", 0))) if first == "CUDAExecutionProvider"
                       else torch.device("cpu"))
        self._ckpt = ckpt
        self._features = feature_outputs(ckpt)
        self._torch: Predictor | None = None

    @property
    def model(self) -> torch.nn.Module:
        """The checkpoint's torch model (built on first use; Grad-CAM needs its gradients)."""
        return self._torch_predictor().model

    def _torch_predictor(self) -> Predictor:
        if self._torch is None:
            self._torch = Predictor.from_checkpoint(self._ckpt, "cpu")
        return self._torch

    def outputs(self, images: torch.Tensor, features: bool = True, batch_size: int = 64) -> Outputs:
        """Logits (and, with ``features``, every block's spatially pooled output) for uint8 (N, S, S) images."""
        if images.dtype != torch.uint8:
            raise ValueError(f"the ONNX graph takes uint8 (N, S, S) pixels, got {images.dtype}")
        names = [LOGITS, *self._features] if features else [LOGITS]
        pixels = np.ascontiguousarray(images.cpu().numpy())
        runs = [self.session.run(names, {GRAPH_INPUT: pixels[start:start + batch_size]})
                for start in range(0, len(pixels), batch_size)]
        if not runs:
            return Outputs(torch.zeros((0, 2)), [])
        logits = torch.from_numpy(np.concatenate([r[0] for r in runs]))
        feats = [torch.from_numpy(np.concatenate([r[i] for r in runs])) for i in range(1, len(names))]
        return Outputs(logits, feats)

    def logits(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Logits (N, 2) on the CPU for uint8 (N, S, S) images."""
        return self.outputs(images, features=False, batch_size=batch_size).logits

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, 2), float64, calibrated with this model's temperature (and intercept)."""
        return calibrated_probs(logits, self.temperature, self.bias)

    def gradcam(self, pixels: np.ndarray | torch.Tensor, target_class: int = 1) -> np.ndarray:
        """Grad-CAM of ``target_class`` for one uint8 (S, S) image, from the torch model."""
        return self._torch_predictor().gradcam(pixels, target_class)


def onnx_providers(device: torch.device) -> list:
    """ONNX Runtime's execution providers for ``device``: on CUDA the device's own GPU (``device_id``; without
    it every torchrun rank ran on GPU 0), the CPU behind it for what CUDA lacks; else the CPU."""
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    index = device.index if device.index is not None else torch.cuda.current_device()
    return [("CUDAExecutionProvider", {"device_id": int(index)}), "CPUExecutionProvider"]


def default_onnx_cache() -> Path:
    """Where int8 models are cached: ``$XDG_CACHE_HOME/pneumoscan/onnx`` (``~/.cache/pneumoscan/onnx``)."""
    from .data import default_cache_dir

    return default_cache_dir() / "onnx"


def int8_model(ckpt: dict, calibration_dir: str | os.PathLike | None = None,
               cache_dir: str | os.PathLike | None = None) -> Path | bytes:
    """The cached int8 model file of ``ckpt``, quantised now (calibrated on ``calibration_dir``) if not cached yet.

    Where the cache cannot be written (a read-only home in a container, a full disk), the model just
    built is returned as bytes, with a warning: it is used for this run and built again at the next start.

    Raises:
        DataError: the int8 model is not cached and no ``calibration_dir`` is given.
    """
    digest = weights_digest(ckpt)
    path = Path(cache_dir or default_onnx_cache()) / f"{digest[:24]}-{INT8_RECIPE}.onnx"
    if path.is_file():
        try:
            meta = read_metadata(path)
        except (ValueError, OSError) as exc:
            log.warning("rebuilding unreadable cached int8 model %s (%s)", path, exc)
        else:
            if meta["weights_sha256"] == digest and meta["int8_recipe"] == INT8_RECIPE:
                log.info("int8 model from cache %s", path)
                return path
            log.warning("rebuilding cached int8 model %s: it belongs to other weights", path)
    if calibration_dir is None and stored_ranges(ckpt) is None:
        stale = stale_calibration(ckpt)
        raise DataError(f"the onnx-int8 backend calibrates its int8 model once on the training images of the "
                        f"data set the model was trained on{f' ({stale})' if stale else ''}: pass calibration_dir "
                        f"(--calibration_dir DIR, the data set root holding train/), or use the onnx backend")
    log.info("quantising the model to int8 (once; cached in %s)", path.parent)
    model = onnx_model(ckpt)
    ranges = int8_ranges(ckpt, model, calibration_dir)
    with tempfile.TemporaryDirectory() as work:  # built apart, so that a cache that cannot be written costs no rebuild
        data = quantize_int8(model, ranges, Path(work) / path.name).read_bytes()
    try:
        with atomic_path(path, durable=True) as tmp:
            tmp.write_bytes(data)
    except OSError as exc:
        log.warning("cannot cache the int8 model in %s (%s): it is used from memory for this run and built again "
                    "at every start; set XDG_CACHE_HOME to a folder you can write to", path.parent,
                    exc.strerror or exc)
        return data
    return path


def resolve_backend(ckpt: dict, device: torch.device | str, backend: str) -> str:
    """``auto`` made concrete: ``onnx-int8`` on the CPU when onnxruntime is installed and the checkpoint
    carries its int8 calibration (it then builds without data), else ``torch`` (CUDA, no onnxruntime,
    or a checkpoint without calibration ranges). Other names are returned as they are."""
    if backend != "auto":
        return backend
    device = torch.device(device) if not isinstance(device, str) else resolve_device(device)
    if device.type != "cpu" or stored_ranges(ckpt) is None:
        stale = stale_calibration(ckpt) if device.type == "cpu" else ""
        if stale:  # it did run int8 with the pneumoscan that calibrated it: say why it does not now
            log.warning("predicting with the torch backend, not onnx-int8: %s", stale)
        return "torch"
    try:
        require("onnxruntime")
    except OnnxUnavailableError:
        log.info("onnxruntime is not installed: predicting with the torch backend (pip install "
                 "'pneumoscan[onnx]' for the faster int8 backend)")
        return "torch"
    return "onnx-int8"


def make_predictor(ckpt: dict, device: torch.device | str = "cpu", backend: str = "torch", *,
                   calibration_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                   num_threads: int | None = None):
    """A predictor for a loaded checkpoint on ``backend`` (one of ``BACKENDS``).

    Args:
        ckpt: from ``checkpoint.load_checkpoint``.
        device: a ``torch.device`` or ``auto``, ``cpu``, ``cuda``; ``auto`` is CUDA when present for
            ``torch`` and the CPU for the ONNX backends. ``onnx`` runs on CUDA only through
            onnxruntime-gpu; ``onnx-int8`` is CPU only.
        backend: ``torch`` (reference), ``onnx`` (float32 ONNX Runtime), ``onnx-int8`` or ``auto``
            (``resolve_backend``).
        calibration_dir: for ``onnx-int8`` when its model is not cached yet: the data set root the model
            was trained on (its validation split is left out of the calibration).
        cache_dir: where int8 models are cached (default ``default_onnx_cache()``).
        num_threads: ONNX Runtime intra-op threads (default: torch's thread count).

    Raises:
        ValueError: unknown backend, or a device the backend cannot use.
        OnnxUnavailableError: an ONNX backend without onnxruntime installed.
        DataError: ``onnx-int8`` with nothing cached and no ``calibration_dir``.
    """
    backend = resolve_backend(ckpt, device, backend)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}")
    if isinstance(device, str):
        device = torch.device("cpu") if device == "auto" and backend != "torch" else resolve_device(device)
    if backend == "torch":
        return Predictor.from_checkpoint(ckpt, device)
    if device.type == "cuda":
        if backend == "onnx-int8":
            raise ValueError("the onnx-int8 backend runs on the CPU; use --device cpu, or --backend torch on CUDA")
        if "CUDAExecutionProvider" not in require("onnxruntime").get_available_providers():
            raise ValueError("the onnx backend on CUDA needs onnxruntime-gpu; use --device cpu, or --backend torch "
                             "on CUDA")
    elif device.type != "cpu":
        raise ValueError(f"the {backend} backend runs on cpu or cuda, not {device.type}")
    providers = onnx_providers(device)
    if backend == "onnx":
        return OnnxPredictor(onnx_model(ckpt).SerializeToString(), ckpt, num_threads, providers)
    return OnnxPredictor(int8_model(ckpt, calibration_dir, cache_dir), ckpt, num_threads, providers)
