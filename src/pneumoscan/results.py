"""Serialising results: the one place dataclasses and metrics become JSON."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np

from .atomic import write_text


def to_jsonable(obj):
    """Dataclasses, numpy values and paths to plain JSON types; NaN and inf become None."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dumps(obj) -> str:
    return json.dumps(to_jsonable(obj), indent=2, allow_nan=False)


def write_json(obj, path: str | os.PathLike) -> None:
    """Write ``obj`` as JSON atomically (temp file, then rename)."""
    write_text(path, dumps(obj) + "\n")
