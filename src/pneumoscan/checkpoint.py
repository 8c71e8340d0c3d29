"""Checkpoints: dicts of state_dicts plus everything inference needs, written atomically.

A checkpoint is untrusted input: it is loaded with ``torch.load(weights_only=True)``,
so only tensors and plain containers are accepted, never pickled code.
"""

from __future__ import annotations

import logging
import os
import pickle
import platform
import zipfile
from pathlib import Path

import torch

from . import __version__
from .atomic import atomic_path, check_writable, same_file
from .errors import CheckpointError, DataError
from .model import MedicalCNN, model_from_kwargs, model_kwargs
from .predict import CLASS_NAMES, InputSpec
from .preprocess import COMPATIBLE_PREPROCESS, DEFAULT_NORMALIZATION, PREPROCESS_VERSION

log = logging.getLogger(__name__)

FORMAT = "pneumoscan-checkpoint"
# 2: the input contract is one ``input_spec`` dict (format 1 had image_size, normalization,
# in_channels and preprocess at the top level; load_checkpoint still reads those).
# 3: the input spec may ask for equalised grey levels (``intensity``); only such checkpoints are
# written as 3, so that a pneumoscan that cannot equalise refuses them instead of feeding raw levels.
# 4: the calibration may have an intercept (``calibration_bias``, ``pneumoscan calibrate --intercept``); only such
# checkpoints are written as 4, so that a pneumoscan that would ignore it refuses them.
# 5: the gate may store wide precision matrices packed (an ensemble's; ``gate.PACK_ABOVE_DIM``); only such
# checkpoints are written as 5.
FORMAT_VERSION = 5
EQUALIZE_FORMAT_VERSION = 3
BIAS_FORMAT_VERSION = 4
PACKED_GATE_FORMAT_VERSION = 5
SHIPPED_MODEL = "pneumoscan-v2.pth"


def default_model_path() -> Path:
    """The model shipped inside the package, used when no ``--model_path`` is given.

    Raises:
        CheckpointError: the installed package lacks its weights (a broken install).
    """
    path = Path(__file__).parent / "weights" / SHIPPED_MODEL
    if not path.is_file():
        raise CheckpointError(f"the shipped model {path} is missing: reinstall pneumoscan, "
                              f"or pass --model_path to a checkpoint of your own")
    return path


def protected_checkpoint(output_path: str | os.PathLike, model_path: str | os.PathLike | None,
                         role: str) -> str | None:
    """What ``output_path`` would write over, if it is a checkpoint no command may replace: "the shipped
    model", or "the checkpoint being <role>" (``model_path``, the command's input); None otherwise."""
    try:
        protected = [(default_model_path(), "the shipped model")]
    except CheckpointError:
        protected = []  # a broken install without its weights: nothing shipped to protect
    mine = [(model_path, f"the checkpoint being {role}")] if model_path else []
    for other, what in [*protected, *mine]:
        if same_file(output_path, other):
            return what
    return None


def check_output_path(inputs: str | os.PathLike | list, output_path: str | os.PathLike, flag: str = "--output_path",
                      new_file: bool = True, role: str = "calibrated") -> Path:
    """The path to write a new checkpoint (or, with ``flag``, its report) to, made from the checkpoint(s)
    ``inputs``; checked before any work.

    Raises:
        DataError: ``output_path`` is an input checkpoint or the shipped model, a folder, its folder is
            missing or cannot be written, or (``new_file``) it exists already; a checkpoint (the default
            ``flag``) not named .pth or .pt (a "site.jpg" checkpoint would later be read as a broken film).
    """
    out = Path(output_path).expanduser()
    if flag == "--output_path" and out.suffix.lower() not in (".pth", ".pt"):
        raise DataError(f"{flag} {output_path}: a checkpoint is written there; give a path ending in .pth")
    for source in inputs if isinstance(inputs, list) else [inputs]:
        what = protected_checkpoint(out, source, role)
        if what:
            raise DataError(f"{flag} {output_path} is {what}; write to a new file "
                            f"(the original stays as it was, so every earlier result stays traceable)")
    if out.is_dir():
        raise DataError(f"{flag} {output_path} is a folder; give a file name in it")
    if not out.parent.is_dir():
        raise DataError(f"{flag} {output_path}: folder {out.parent} does not exist; create it first")
    if new_file and out.exists():
        raise DataError(f"{flag} {output_path} exists already; give a new file name (a checkpoint pneumoscan makes "
                        f"never replaces another, so every earlier result stays traceable), or remove it first")
    check_writable(out, flag)
    return out


def format_version(payload: dict) -> int:
    """The oldest checkpoint format that reads ``payload`` right (see FORMAT_VERSION): 5 with a packed gate, 4 with
    a calibration intercept, 3 with equalised input, else 2."""
    from .gate import has_packed_precisions

    if has_packed_precisions(payload.get("ood_gate")):
        return PACKED_GATE_FORMAT_VERSION
    if payload.get("calibration_bias"):
        return BIAS_FORMAT_VERSION
    return EQUALIZE_FORMAT_VERSION if payload["input_spec"].get("intensity", "raw") != "raw" else 2


def versions() -> dict[str, str]:
    return {"pneumoscan": __version__, "torch": str(torch.__version__), "python": platform.python_version()}


def save_checkpoint(payload: dict, path: str | os.PathLike, exclusive: bool = False) -> None:
    """Write ``payload`` to ``path`` atomically: a crash leaves the old file or the new one, never half.
    With ``exclusive`` an existing file is never replaced (``FileExistsError``). A model checkpoint's
    ``format_version`` is raised to what its contents need (a gate or an intercept added since it was made)."""
    if payload.get("format") == FORMAT and "input_spec" in payload:
        payload = {**payload, "format_version": max(int(payload.get("format_version", 2)), format_version(payload))}
    with atomic_path(path, durable=True, exclusive=exclusive) as tmp:
        torch.save(payload, tmp)


def model_payload(model: torch.nn.Module, *, arch: str, model_kw: dict, spec: InputSpec, config: dict,
                  temperature: float | None = None, threshold: float = 0.5, metrics: dict | None = None,
                  epoch: int | None = None, model_version: str = "", ood_gate: dict | None = None) -> dict:
    """The checkpoint dict for a trained model (weights copied, not referenced)."""
    if spec.in_channels != int(model_kw["in_channels"]):
        raise ValueError(f"input spec has {spec.in_channels} channel(s), the model {model_kw['in_channels']}")
    return {
        "format": FORMAT,
        "format_version": format_version({"input_spec": spec.to_dict(), "ood_gate": ood_gate}),
        "model_state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "arch": arch,
        "model_kwargs": model_kw,
        "class_names": list(CLASS_NAMES),
        "input_spec": spec.to_dict(),
        "temperature": None if temperature is None else float(temperature),
        "threshold": float(threshold),
        "ood_gate": ood_gate,
        "metrics": metrics or {},
        "epoch": epoch,
        "model_version": model_version,
        "config": config,
        "versions": versions(),
    }


def load_checkpoint(path: str | os.PathLike, flag: str = "--model_path") -> dict:
    """Load and check a checkpoint; a bare MedicalCNN state_dict is accepted with seed defaults. ``flag``: the
    option that named it, for the messages (``--init_from``, ``--members``).

    Raises:
        CheckpointError: missing file, not a torch file, pickled objects instead of a
            state dict, or missing fields.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a folder; pass {flag} to the .pth file in it "
                              f"(pneumoscan train writes medical_cnn_model.pth)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; pass {flag} to a .pth "
                              f"written by pneumoscan train")
    with open(path, "rb") as f:
        head = f.read(2)
    # torch.save writes a zip archive; the legacy format starts with a pickle protocol byte (0x80)
    if not zipfile.is_zipfile(path) and not head.startswith(b"\x80"):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle), or it is "
                              f"truncated or corrupt; pass {flag} to a whole .pth written by pneumoscan train")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} is not a state-dict checkpoint: it holds pickled Python objects, which are not "
            f"loaded because they could run code (save model.state_dict() or use pneumoscan train) "
            f"[{str(exc).splitlines()[0]}]") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({exc})") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict or state dict")
    if obj.get("format") == FORMAT:
        version = obj.get("format_version", 0)
        if not isinstance(version, int) or isinstance(version, bool):
            raise CheckpointError(f"{path}: format_version {version!r} is not a whole number; the file is damaged "
                                  f"or was not written by pneumoscan")
        if version > FORMAT_VERSION:
            raise CheckpointError(f"{path} was written by a newer pneumoscan (format "
                                  f"{obj['format_version']}); upgrade pneumoscan to read it")
        if obj.get("format_version", 0) < 2 and "input_spec" not in obj:
            _upgrade_v1(obj)
        missing = [k for k in ("model_state", "model_kwargs", "input_spec") if k not in obj]
        if missing:
            raise CheckpointError(f"{path} is a pneumoscan checkpoint without {', '.join(missing)}")
        input_spec(obj, path)  # refuse an unusable input contract here, not at the first prediction
        if obj["input_spec"]["preprocess"] not in COMPATIBLE_PREPROCESS:
            log.warning("%s was trained with preprocessing %r, this pneumoscan uses %r: its outputs may differ "
                        "from those it was validated with", path, obj["input_spec"]["preprocess"],
                        PREPROCESS_VERSION)
        return obj
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        log.warning("%s is a bare state dict: assuming the seed MedicalCNN, 224 px, 3 channels, "
                    "default normalisation, no calibration", path)
        in_ch = int(obj["features.0.conv1.weight"].shape[1]) if "features.0.conv1.weight" in obj else 3
        kw = model_kwargs("medical_cnn", in_ch)
        spec = InputSpec(224, DEFAULT_NORMALIZATION["mean"], DEFAULT_NORMALIZATION["std"], in_ch)
        payload = model_payload(MedicalCNN(**{**kw, "widths": tuple(kw["widths"])}), arch="medical_cnn",
                                model_kw=kw, spec=spec, config={}, model_version=f"bare-state-dict:{path.name}")
        payload["model_state"] = obj
        return payload
    raise CheckpointError(f"{path} is a dict but neither a pneumoscan checkpoint nor a state dict "
                          f"(keys: {', '.join(list(map(str, obj))[:8])})")


def _upgrade_v1(obj: dict) -> None:
    """Format 1 kept the input contract in four top-level keys; gather them into ``input_spec``."""
    if "image_size" not in obj or "normalization" not in obj:
        return  # incomplete: reported as such by the caller
    norm = obj.pop("normalization")
    in_ch = obj.pop("in_channels", (obj.get("model_kwargs") or {}).get("in_channels", 3))
    obj["input_spec"] = {"image_size": obj.pop("image_size"), "mean": norm.get("mean"), "std": norm.get("std"),
                         "in_channels": in_ch, "preprocess": obj.pop("preprocess", PREPROCESS_VERSION)}
    obj["format_version"] = 2


def input_spec(ckpt: dict, path: str | os.PathLike = "checkpoint") -> InputSpec:
    """The input contract of a loaded checkpoint.

    Raises:
        CheckpointError: the stored contract is missing fields or holds impossible values.
    """
    try:
        return InputSpec.from_dict(ckpt["input_spec"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: unusable input specification {ckpt.get('input_spec')!r} ({exc})") from exc


def model_from_checkpoint(ckpt: dict) -> MedicalCNN:
    """The network a checkpoint describes, with its weights, in eval mode.

    Raises:
        CheckpointError: the described architecture cannot be built (arguments of another pneumoscan version,
            or damaged), or the weights do not fit it.
    """
    try:
        model = model_from_kwargs(ckpt["model_kwargs"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"the checkpoint's architecture ({ckpt.get('arch')!r}) cannot be built from its "
                              f"model_kwargs ({type(exc).__name__}: {exc}): it was written by another pneumoscan "
                              f"version, or is damaged") from exc
    try:
        model.load_state_dict(ckpt["model_state"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint weights do not match its architecture: {exc}") from exc
    return model.eval()
