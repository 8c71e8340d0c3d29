"""ONNX export of a checkpoint's model, its int8 quantisation, and ``pneumoscan export``.

The graph's interface (``GRAPH_INPUT``, ``LOGITS``, ``feature_outputs``), so that another runtime
needs only the stretch resize of ``InputSpec.pixels``:

- input ``pixels``: uint8 (N, S, S), the stretch-resized grayscale image; scaling to [0, 1],
  per-film equalisation for a model trained with ``--intensity equalize``, ``(x - mean) / std``
  and the replication to the model's channels happen inside the graph, traced from
  ``InputSpec.to_tensor``;
- output ``logits``: float32 (N, 2), uncalibrated; P(PNEUMONIA) = sigmoid((logits[1] - logits[0]) / temperature
  + calibration_bias) (the bias is 0 except for ``pneumoscan calibrate --intercept``; a temperature of null
  is a model left uncalibrated: 1), called PNEUMONIA when it is at least ``threshold``;
- outputs ``features_0`` .. ``features_4``: float32 (N, C_i), each conv block's output averaged
  over space (``MedicalCNN.forward_with_features``), what the out-of-scope gate scores.

The graph's ``metadata_props`` carry what a prediction needs besides the graph: the input spec,
temperature and calibration bias, operating threshold, class names, model version, whether the checkpoint has
an out-of-scope gate and a scope classifier (their statistics and weights stay in the checkpoint: the graph
alone answers every input, lateral views, adult films and non-radiographs included; a prediction with the scope
checks needs pneumoscan and the .pth),
and two digests: ``weights_sha256`` (``weights_digest``: the network alone, the same for a site checkpoint as for
the model it recalibrated) and, when exported from a file, ``checkpoint_file_sha256`` (``sha256sum`` of that
.pth, which tells a site's export from the shipped one). ``read_metadata`` parses them back; format 1 files,
whose weights digest was misleadingly called ``checkpoint_sha256``, are read too.

onnx and onnxruntime are imported only here, lazily, so ``import pneumoscan`` never needs them.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_path, check_writable, refuse_input_suffix
from .checkpoint import default_model_path, input_spec, load_checkpoint, model_from_checkpoint, protected_checkpoint
from .errors import CheckpointError, DataError, OutputPathError, PneumoscanError
from .predict import InputSpec, calibration_bias

log = logging.getLogger(__name__)

GRAPH_INPUT = "pixels"
LOGITS = "logits"
OPSET = 17
METADATA_FORMAT = "pneumoscan-onnx-2"
# format 1 called the weights digest ``checkpoint_sha256``; a format 1 reader refuses format 2 (and so rebuilds
# a cached int8 model) instead of taking the key for what its name says
READABLE_METADATA_FORMATS = ("pneumoscan-onnx-1", METADATA_FORMAT)
# Changing how the int8 model is made changes this, so cached int8 models are rebuilt.
INT8_RECIPE = "qdq-u8s8-perchannel-minmax-fp32stem-v2"
CALIBRATION_IMAGES = 256
ONNX_EXTRA = "pip install 'pneumoscan[onnx]'"


class OnnxUnavailableError(PneumoscanError, ImportError):
    """onnx or onnxruntime, needed for export and the ONNX backends, is not installed."""


def require(module: str):
    """Import ``module`` (``onnx``, ``onnxruntime``, ``onnxruntime.quantization``) or say how to install it.

    Raises:
        OnnxUnavailableError: the module is missing.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise OnnxUnavailableError(f"{module} is not installed; ONNX export and the onnx backends need it: "
                                   f"{ONNX_EXTRA}") from exc


def feature_outputs(ckpt: dict) -> list[str]:
    """Names of the per-block feature outputs of the checkpoint's graph, shallowest block first."""
    return [f"features_{i}" for i in range(len(ckpt["model_kwargs"]["widths"]))]


def weights_digest(ckpt: dict) -> str:
    """sha256 of what fixes the model's outputs: architecture, input spec and every weight tensor."""
    h = hashlib.sha256()
    h.update(json.dumps([ckpt["model_kwargs"], ckpt["input_spec"]], sort_keys=True).encode())
    for name in sorted(ckpt["model_state"]):
        t = ckpt["model_state"][name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _PixelsToOutputs(torch.nn.Module):
    """uint8 (N, S, S) -> (logits, *pooled block features): the traced body of the graph."""

    def __init__(self, model: torch.nn.Module, spec: InputSpec) -> None:
        super().__init__()
        self.model = model
        self.spec = spec

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, pooled = self.model.forward_with_features(self.spec.to_tensor(pixels))
        return (logits, *pooled)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (what ``sha256sum`` prints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def onnx_model(ckpt: dict, opset: int = OPSET, checkpoint_path: str | os.PathLike | None = None):
    """The checkpoint's model as an in-memory ``onnx.ModelProto`` with dynamic batch and metadata;
    ``checkpoint_path``, the file ``ckpt`` was loaded from, adds its ``checkpoint_file_sha256``.

    Raises:
        OnnxUnavailableError: onnx is not installed.
    """
    onnx = require("onnx")
    spec = input_spec(ckpt)
    wrapped = _PixelsToOutputs(model_from_checkpoint(ckpt), spec).eval()
    outputs = [LOGITS, *feature_outputs(ckpt)]
    example = torch.zeros((2, spec.image_size, spec.image_size), dtype=torch.uint8)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The dynamo exporter needs onnxscript, which the [onnx] extra does not install; the
        # TorchScript exporter, deprecated but exact for this plain CNN (tests compare it with
        # torch), warns about itself: only for this call, its deprecation notices are not shown.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(wrapped, (example,), buf, dynamo=False, input_names=[GRAPH_INPUT],
                          output_names=outputs, dynamic_axes={n: {0: "batch"} for n in [GRAPH_INPUT, *outputs]},
                          opset_version=opset, do_constant_folding=True)
    model = onnx.load_from_string(buf.getvalue())
    model.doc_string = (f"pneumoscan {ckpt.get('arch', 'model')}: uint8 {GRAPH_INPUT} (N, {spec.image_size}, "
                        f"{spec.image_size}) -> {LOGITS} (N, 2) and pooled block features")
    props = _metadata(ckpt)
    if checkpoint_path is not None:
        props["checkpoint_file_sha256"] = file_sha256(checkpoint_path)
    onnx.helper.set_model_props(model, props)
    return model


def _metadata(ckpt: dict) -> dict[str, str]:
    gate = ckpt.get("ood_gate")
    gate_note = ({"present": True, "kind": gate.get("kind"), "layers": list(gate.get("layers", [])),
                  # the limit answers differ by (a site checkpoint may have raised it: calibrate --refit_gate)
                  "threshold": gate.get("threshold"), "quantile": gate.get("quantile"),
                  "fitted_on": gate.get("fitted_on", "validation radiographs"),
                  "note": "the gate's statistics are in the pneumoscan checkpoint (.pth): load it with "
                          "pneumoscan.checkpoint.load_checkpoint and score the features_* outputs with "
                          "pneumoscan.gate.OutOfScopeGate"} if gate else {"present": False})
    scope = ckpt.get("scope_classifier")
    scope_note = ({"present": True, "kind": scope.get("kind"), "classes": list(scope.get("classes", [])),
                   "threshold": scope.get("threshold"),
                   "note": "the scope classifier (what refuses lateral views, adult films, other body parts, altered "
                           "films and non-radiographs) is in the pneumoscan checkpoint (.pth): "
                           "pneumoscan.scope.ScopeClassifier scores the features_* outputs; the graph alone answers "
                           "them all"} if scope else {"present": False})
    return {
        "pneumoscan.format": METADATA_FORMAT,
        "input_spec": json.dumps(ckpt["input_spec"]),
        "temperature": json.dumps(ckpt.get("temperature")),
        "calibration_bias": json.dumps(calibration_bias(ckpt)),
        "threshold": json.dumps(float(ckpt.get("threshold", 0.5))),
        "class_names": json.dumps(list(ckpt.get("class_names", []))),
        "model_version": str(ckpt.get("model_version") or ""),
        "weights_sha256": weights_digest(ckpt),
        "ood_gate": json.dumps(gate_note),
        "scope_classifier": json.dumps(scope_note),
        "outputs": json.dumps([LOGITS, *feature_outputs(ckpt)]),
    }


def read_metadata(model) -> dict:
    """The pneumoscan metadata of an ONNX model (``ModelProto`` or path), JSON fields decoded.

    ``weights_sha256`` is ``weights_digest`` of the exported checkpoint (format 1's ``checkpoint_sha256``);
    ``checkpoint_file_sha256`` the exported file's sha256, or None (not exported from a file, or format 1);
    ``scope_classifier`` whether the checkpoint has one ({"present": ...}; None in format 1).

    Raises:
        ValueError: the model carries no pneumoscan metadata (not written by ``export_onnx``).
        CheckpointError (a ValueError): the file is not a readable ONNX model (truncated, corrupt, another
            format), or its pneumoscan metadata is incomplete or damaged.
        OSError: the file cannot be read.
    """
    onnx = require("onnx")
    from google.protobuf.message import DecodeError  # onnx's own dependency

    where = "ONNX model" if isinstance(model, onnx.ModelProto) else str(model)
    if not isinstance(model, onnx.ModelProto):
        try:
            model = onnx.load(str(model), load_external_data=False)
        except DecodeError as exc:
            raise CheckpointError(f"{where} is not a readable ONNX model (truncated, corrupt, or not ONNX: {exc}); "
                                  f"export it again with pneumoscan export") from exc
    props = {p.key: p.value for p in model.metadata_props}
    version = props.get("pneumoscan.format")
    if version not in READABLE_METADATA_FORMATS:
        raise ValueError(f"{where} has no {METADATA_FORMAT} metadata"
                         f"{f' (it has {version!r}: upgrade pneumoscan)' if version else ''}; "
                         f"export it with pneumoscan export")
    try:
        out = {k: json.loads(props[k]) for k in ("input_spec", "temperature", "threshold", "class_names",
                                                 "ood_gate", "outputs")}
        out["calibration_bias"] = json.loads(props.get("calibration_bias", "0.0"))  # absent in older exports: 0
        out["model_version"] = props["model_version"]
        out["weights_sha256"] = props["weights_sha256" if version == METADATA_FORMAT else "checkpoint_sha256"]
        out["input_spec"] = InputSpec.from_dict(out["input_spec"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: its {version} metadata is incomplete or damaged ({type(exc).__name__}: "
                              f"{exc}); export it again with pneumoscan export") from exc
    try:  # format 1 did not say whether the checkpoint has one: None
        out["scope_classifier"] = json.loads(props["scope_classifier"]) if "scope_classifier" in props else None
    except ValueError as exc:
        raise CheckpointError(f"{where}: its scope_classifier metadata is damaged ({exc}); export it again") from exc
    out["checkpoint_file_sha256"] = props.get("checkpoint_file_sha256")
    out["format"] = version
    out["int8_recipe"] = props.get("int8_recipe")
    return out


def save_onnx(model, path: str | os.PathLike, exclusive: bool = False) -> Path:
    """Write an ``onnx.ModelProto`` to ``path`` atomically (one self-contained file); with ``exclusive`` an
    existing ``path`` is never replaced (``FileExistsError``)."""
    onnx = require("onnx")
    path = Path(path)
    with atomic_path(path, durable=True, exclusive=exclusive) as tmp:
        onnx.save_model(model, str(tmp))
    return path


def export_onnx(ckpt: dict, path: str | os.PathLike, opset: int = OPSET) -> Path:
    """Write the checkpoint's model as a float32 ONNX graph (interface in the module docstring) to ``path``.

    Returns the path written. Raises ``OnnxUnavailableError`` when onnx is not installed.
    """
    path = save_onnx(onnx_model(ckpt, opset), path)
    log.info("wrote float32 ONNX model to %s", path)
    return path


def calibration_images(ckpt: dict, data_dir: str | os.PathLike, n: int = CALIBRATION_IMAGES,
                       seed: int = 0) -> torch.Tensor:
    """``n`` uint8 (S, S) training images of the data set ``data_dir`` the checkpoint was trained on.

    The split is rebuilt from the checkpoint's stored config, so none of the images comes from the
    validation split its threshold, temperature and gate were chosen on.

    Raises:
        DataError: ``data_dir`` is not a usable labelled data set.
    """
    from .data import split_from_config

    spec = input_spec(ckpt)
    train = split_from_config(ckpt.get("config") or {}, str(data_dir), spec.image_size).train
    if len(train) == 0:
        raise DataError(f"{data_dir}: no training images to calibrate the int8 model on")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    log.info("calibrating on %d of %d training images (validation split left out)", len(order), len(train))
    return train.images[order.sort().values]


class _Batches:
    """The ``CalibrationDataReader`` protocol over uint8 images (duck-typed: get_next / rewind)."""

    def __init__(self, images: np.ndarray, batch_size: int = 16) -> None:
        self.images, self.batch_size, self.start = images, batch_size, 0

    def get_next(self) -> dict | None:
        if self.start >= len(self.images):
            return None
        batch = self.images[self.start:self.start + self.batch_size]
        self.start += self.batch_size
        return {GRAPH_INPUT: batch}

    def rewind(self) -> None:
        self.start = 0


INT8_OPS = ["Conv", "MaxPool", "Relu"]


def _prepare(model, work: Path) -> tuple[Path, str]:
    """The graph after onnxruntime's recommended pre-processing (shape inference, clean-up), and the
    name of its first conv (kept float32)."""
    onnx = require("onnx")
    q = require("onnxruntime.quantization")
    prepared = work / "prepared.onnx"
    q.quant_pre_process(model, prepared)
    stem = next(n.name for n in onnx.load(str(prepared)).graph.node if n.op_type == "Conv")
    return prepared, stem


def calibration_ranges(model, images: torch.Tensor) -> dict[str, list[float]]:
    """Min/max of every activation the int8 graph quantises, seen on uint8 (N, S, S) ``images``.

    These few numbers are all that static quantisation learns from data: stored in a checkpoint
    (``int8_calibration``), they rebuild the same int8 graph later without any images.

    Raises:
        ValueError: no calibration images.
    """
    cal = require("onnxruntime.quantization.calibrate")
    if len(images) == 0:
        raise ValueError("int8 calibration needs images, got none")
    reader = _Batches(np.ascontiguousarray(torch.as_tensor(images, dtype=torch.uint8).numpy()))
    with tempfile.TemporaryDirectory() as work:
        prepared, _ = _prepare(model, Path(work))
        calibrator = cal.create_calibrator(prepared, INT8_OPS, augmented_model_path=str(Path(work) / "aug.onnx"),
                                           calibrate_method=cal.CalibrationMethod.MinMax)
        calibrator.collect_data(reader)
        data = calibrator.compute_data()
    return {name: [float(np.asarray(td.range_value[0]).reshape(-1)[0]),
                   float(np.asarray(td.range_value[1]).reshape(-1)[0])] for name, td in data.data.items()}


def int8_calibration(ckpt: dict, images: torch.Tensor) -> dict:
    """The ``int8_calibration`` entry of a checkpoint: the recipe and the activation ranges on ``images``."""
    return {"recipe": INT8_RECIPE, "images": int(len(images)), "ranges": calibration_ranges(onnx_model(ckpt), images)}


def stored_ranges(ckpt: dict) -> dict[str, list[float]] | None:
    """The activation ranges a checkpoint carries for this int8 recipe, or None."""
    stored = ckpt.get("int8_calibration") or {}
    return stored.get("ranges") if stored.get("recipe") == INT8_RECIPE else None


def stale_calibration(ckpt: dict) -> str:
    """Why a checkpoint's stored int8 calibration cannot be used (made for another recipe), or ''."""
    stored = ckpt.get("int8_calibration") or {}
    if not stored or stored.get("recipe") == INT8_RECIPE:
        return ""
    return (f"its int8 calibration was made for the recipe {stored.get('recipe')!r}, this pneumoscan quantises "
            f"with {INT8_RECIPE!r} (store it again: python experiments/int8_calibrate.py --model_path M "
            f"--data_dir DATA)")


def int8_ranges(ckpt: dict, model, calibration_dir: str | os.PathLike | None,
                n: int = CALIBRATION_IMAGES) -> dict[str, list[float]]:
    """Ranges calibrated on ``calibration_dir``'s training images when given, else the checkpoint's own.

    Raises:
        DataError: neither is available.
    """
    if calibration_dir is not None:
        return calibration_ranges(model, calibration_images(ckpt, calibration_dir, n))
    ranges = stored_ranges(ckpt)
    if ranges is None:
        why = stale_calibration(ckpt) or "this checkpoint carries no int8 calibration"
        raise DataError(f"{why}: pass --calibration_dir, the data set root it was trained on (holds train/), to "
                        f"calibrate on its training images")
    return ranges


def quantize_int8(model, ranges: dict[str, list[float]], path: str | os.PathLike, exclusive: bool = False) -> Path:
    """Static int8 quantisation of a float32 graph from ``onnx_model`` with activation ``ranges``
    (from ``calibration_ranges``).

    QDQ format (onnxruntime fuses it into integer kernels), weights int8 per output channel,
    activations uint8 per tensor from the given min/max (u8 x s8 is the fast path of x86 VNNI
    and AVX2). Two parts stay float32: the first conv (3 input channels: little to gain, and its
    rounding reaches every later block; keeping it float halved the out-of-scope gate's score
    error at no measured speed cost) and the small classifier head (Gemm; int8 there moved logits
    by up to 0.3 instead of 0.04). The ranges are passed as onnxruntime's per-tensor overrides,
    which take precedence over its own calibration (run here on one blank image only because the
    API requires a reader). Writes to ``path`` atomically and returns it; with ``exclusive`` an existing
    ``path`` is never replaced.

    Raises:
        FileExistsError: ``exclusive`` and ``path`` exists.
        OnnxUnavailableError: onnx or onnxruntime is missing.
        ValueError: the ranges do not cover the graph's activations (made for another graph).
    """
    onnx = require("onnx")
    q = require("onnxruntime.quantization")
    path = Path(path)
    size = _input_size(model)
    blank = _Batches(np.full((1, size, size), 128, dtype=np.uint8))
    # the same form onnxruntime's calibrator returns (float32 arrays of shape (1,)), so the result is identical
    overrides = {name: [{"rmin": np.array([lo], dtype=np.float32), "rmax": np.array([hi], dtype=np.float32)}]
                 for name, (lo, hi) in ranges.items()}
    with tempfile.TemporaryDirectory() as work, atomic_path(path, durable=True, exclusive=exclusive) as tmp:
        prepared, stem = _prepare(model, Path(work))
        needed = _activation_names(onnx.load(str(prepared)))
        missing = sorted(needed - set(ranges))
        if missing:
            raise ValueError(f"the int8 calibration ranges do not fit this graph ({len(missing)} activations "
                             f"without a range, e.g. {missing[0]!r}): recalibrate on images (--calibration_dir)")
        q.quantize_static(prepared, tmp, blank, quant_format=q.QuantFormat.QDQ, per_channel=True,
                          activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                          op_types_to_quantize=INT8_OPS, nodes_to_exclude=[stem],
                          calibrate_method=q.CalibrationMethod.MinMax,
                          extra_options={"TensorQuantOverrides": overrides})
        quantized = onnx.load(str(tmp))
        props = {p.key: p.value for p in model.metadata_props} | {"int8_recipe": INT8_RECIPE}
        onnx.helper.set_model_props(quantized, props)
        onnx.save_model(quantized, str(tmp))
    log.info("wrote int8 ONNX model to %s", path)
    return path


def _activation_names(graph_model) -> set[str]:
    """Float tensors flowing into or out of the ops int8 quantises (what needs a range)."""
    initializers = {i.name for i in graph_model.graph.initializer}
    return {name for node in graph_model.graph.node if node.op_type in INT8_OPS
            for name in (*node.input, *node.output) if name and name not in initializers}


def _input_size(model) -> int:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return int(dims[-1].dim_value)


def _export_parser() -> argparse.ArgumentParser:
    from .cli import user_path

    p = argparse.ArgumentParser(prog="pneumoscan export",
                                description="Export a pneumoscan model for another runtime (ONNX).")
    p.add_argument("--format", required=True, help="onnx (the only format so far)")
    p.add_argument("--output_path", type=user_path, required=True,
                   help="the .onnx file to write (an existing file only with --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output_path (atomically: a failed export leaves it as it was)")
    p.add_argument("--model_path", type=user_path, help="checkpoint from pneumoscan train (default: the shipped model)")
    p.add_argument("--quantize", choices=("int8",), help="int8: static quantisation, calibrated on training images")
    p.add_argument("--calibration_dir", type=user_path,
                   help="with --quantize int8: the data set root the model was trained on (holds train/); "
                        "its validation split, rebuilt from the checkpoint's config, is left out")
    p.add_argument("--calibration_images", type=int, default=CALIBRATION_IMAGES,
                   help=f"how many training images calibrate the int8 model ({CALIBRATION_IMAGES})")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def export_main(argv: list[str] | None = None) -> int:
    """``pneumoscan export``: 0 written, 2 bad usage or input (the log says what to change), 130 interrupted."""
    from .cli import EXIT_BAD_INPUT, EXIT_OK, configure_logging

    args = _export_parser().parse_args(argv)
    configure_logging(verbose=args.verbose)
    if args.format.lower() != "onnx":
        log.error("unknown export format %r; the only format is onnx", args.format)
        return EXIT_BAD_INPUT
    if not args.quantize and (args.calibration_dir or args.calibration_images != CALIBRATION_IMAGES):
        log.error("--calibration_dir and --calibration_images calibrate an int8 model: add --quantize int8, or "
                  "drop them for the float32 model")
        return EXIT_BAD_INPUT
    if args.calibration_dir and not Path(args.calibration_dir).is_dir():
        log.error("calibration_dir %r does not exist or is not a folder; pass the data set root the model was "
                  "trained on (holds train/)", args.calibration_dir)
        return EXIT_BAD_INPUT
    if args.calibration_images < 1:
        log.error("--calibration_images must be >= 1, got %d", args.calibration_images)
        return EXIT_BAD_INPUT
    out = Path(args.output_path)
    if out.is_dir():
        log.error("output_path %s is a folder; name the .onnx file to write", out)
        return EXIT_BAD_INPUT
    try:
        model_path = args.model_path or default_model_path()
        what = protected_checkpoint(out, model_path, "exported")
        if what:
            raise OutputPathError(f"--output_path {out} is {what}; write the ONNX model to a new file "
                                  f"(e.g. model.onnx)")
        refuse_input_suffix(out, "--output_path", ".onnx", allowed=(".onnx",))
        if out.suffix.lower() != ".onnx":
            raise OutputPathError(f"--output_path {out} does not end in .onnx; name the ONNX model file so "
                                  f"(e.g. {out.with_suffix('.onnx').name})")
        if out.exists() and not args.overwrite:
            raise OutputPathError(f"--output_path {out} exists already; give a new file name, or --overwrite to "
                                  f"replace it")
        check_writable(out)
        ckpt = load_checkpoint(model_path)
        model = onnx_model(ckpt, checkpoint_path=model_path)
        checks = [what for what, key in (("out-of-scope gate", "ood_gate"), ("scope classifier", "scope_classifier"))
                  if ckpt.get(key)]
        if checks:
            log.warning("the ONNX graph answers every input: this checkpoint's %s (what refuses non-radiographs, "
                        "lateral views, adult films...) stay in %s, named in the graph's metadata; a deployment of "
                        "the .onnx alone must run them or take only frontal paediatric chest films",
                        " and ".join(checks), model_path)
        exclusive = not args.overwrite  # no race: a file made meanwhile is not replaced either
        if args.quantize:
            quantize_int8(model, int8_ranges(ckpt, model, args.calibration_dir, args.calibration_images), out,
                          exclusive=exclusive)
        else:
            save_onnx(model, out, exclusive=exclusive)
            log.info("wrote float32 ONNX model to %s", out)
    except (PneumoscanError, ValueError) as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    except FileExistsError:
        log.error("--output_path %s was made by something else while exporting; it was left as it is: give a new "
                  "file name, or --overwrite to replace it", out)
        return EXIT_BAD_INPUT
    except OSError as exc:
        log.error("cannot write %s: %s; choose a writable --output_path", out, exc.strerror or exc)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        log.error("interrupted; nothing was written (%s is as it was)", out)
        return 130
    return EXIT_OK
