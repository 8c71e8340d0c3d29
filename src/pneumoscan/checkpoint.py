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
from .data import CLASS_NAMES
from .errors import CheckpointError
from .model import MedicalCNN, model_from_kwargs, model_kwargs
from .preprocess import DEFAULT_NORMALIZATION, PREPROCESS_VERSION

log = logging.getLogger(__name__)

FORMAT = "pneumoscan-checkpoint"
FORMAT_VERSION = 1
SHIPPED_MODEL = "pneumoscan-v1.pth"


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


def versions() -> dict[str, str]:
    return {"pneumoscan": __version__, "torch": str(torch.__version__), "python": platform.python_version()}


def save_checkpoint(payload: dict, path: str | os.PathLike) -> None:
    """Write ``payload`` to ``path`` atomically: a crash leaves the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def model_payload(model: torch.nn.Module, *, arch: str, model_kw: dict, image_size: int,
                  normalization: dict, config: dict, temperature: float | None = None,
                  threshold: float = 0.5, metrics: dict | None = None, epoch: int | None = None,
                  model_version: str = "", ood_gate: dict | None = None) -> dict:
    """The checkpoint dict for a trained model (weights copied, not referenced)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "arch": arch,
        "model_kwargs": model_kw,
        "class_names": list(CLASS_NAMES),
        "image_size": int(image_size),
        "in_channels": int(model_kw["in_channels"]),
        "normalization": {"mean": float(normalization["mean"]), "std": float(normalization["std"])},
        "preprocess": PREPROCESS_VERSION,
        "temperature": None if temperature is None else float(temperature),
        "threshold": float(threshold),
        "ood_gate": ood_gate,
        "metrics": metrics or {},
        "epoch": epoch,
        "model_version": model_version,
        "config": config,
        "versions": versions(),
    }


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load and check a checkpoint; a bare MedicalCNN state_dict is accepted with seed defaults.

    Raises:
        CheckpointError: missing file, not a torch file, pickled objects instead of a
            state dict, or missing fields.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; pass --model_path to a .pth "
                              f"written by pneumoscan train")
    with open(path, "rb") as f:
        head = f.read(2)
    # torch.save writes a zip archive; the legacy format starts with a pickle protocol byte (0x80)
    if not zipfile.is_zipfile(path) and not head.startswith(b"\x80"):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle); "
                              f"pass --model_path to a .pth written by pneumoscan train")
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
        missing = [k for k in ("model_state", "model_kwargs", "image_size", "normalization") if k not in obj]
        if missing:
            raise CheckpointError(f"{path} is a pneumoscan checkpoint without {', '.join(missing)}")
        if obj.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(f"{path} was written by a newer pneumoscan (format "
                                  f"{obj['format_version']}); upgrade pneumoscan to read it")
        return obj
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        log.warning("%s is a bare state dict: assuming the seed MedicalCNN, 224 px, 3 channels, "
                    "default normalisation, no calibration", path)
        in_ch = int(obj["features.0.conv1.weight"].shape[1]) if "features.0.conv1.weight" in obj else 3
        kw = model_kwargs("medical_cnn", in_ch)
        payload = model_payload(MedicalCNN(**{**kw, "widths": tuple(kw["widths"])}), arch="medical_cnn",
                                model_kw=kw, image_size=224, normalization=DEFAULT_NORMALIZATION,
                                config={}, model_version=f"bare-state-dict:{path.name}")
        payload["model_state"] = obj
        return payload
    raise CheckpointError(f"{path} is a dict but neither a pneumoscan checkpoint nor a state dict "
                          f"(keys: {', '.join(list(map(str, obj))[:8])})")


def model_from_checkpoint(ckpt: dict) -> MedicalCNN:
    """The network a checkpoint describes, with its weights, in eval mode.

    Raises:
        CheckpointError: the weights do not fit the described architecture.
    """
    model = model_from_kwargs(ckpt["model_kwargs"])
    try:
        model.load_state_dict(ckpt["model_state"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint weights do not match its architecture: {exc}") from exc
    return model.eval()
