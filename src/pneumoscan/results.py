"""Serialising results: the one place dataclasses and metrics become JSON."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path

import numpy as np

from .atomic import write_text

log = logging.getLogger(__name__)


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


def command_line(script: str, argv: list[str] | None = None) -> str:
    """How a result file was made, for the file itself: ``script`` and its arguments (``sys.argv`` by default)."""
    import sys

    return " ".join(["python", script, *(sys.argv[1:] if argv is None else argv)])


def write_json(obj, path: str | os.PathLike) -> None:
    """Write ``obj`` as JSON atomically (temp file, then rename)."""
    write_text(path, dumps(obj) + "\n")


def scan_jsonl(path: str | os.PathLike) -> tuple[set[str], int]:
    """The ``image_path`` of every complete line of a JSON Lines file, and the byte length of those lines.

    Reading stops at the first line that is not a complete JSON object (a run killed while
    writing leaves at most one such line, at the end).
    """
    done: set[str] = set()
    good = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                obj = json.loads(line)
            except ValueError:
                break
            if not isinstance(obj, dict):
                break
            if obj.get("image_path") is not None:
                done.add(str(obj["image_path"]))
            good += len(line)
    return done, good


class JsonlWriter:
    """Results written as they come: one JSON object per line, flushed after each line.

    A new file must not exist yet (nothing earlier is overwritten); with ``resume`` an existing
    file is continued after its last complete line, and ``done`` holds the paths it already has.

    Raises:
        FileExistsError: the file exists and ``resume`` is False.
    """

    def __init__(self, path: str | os.PathLike, resume: bool = False) -> None:
        self.path = Path(path)
        self.done: set[str] = set()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size > 0:
            if not resume:
                raise FileExistsError(f"{self.path} already exists: pass --resume to continue it, or remove it "
                                      f"to start over")
            self.done, good = scan_jsonl(self.path)
            if good < self.path.stat().st_size:
                log.warning("%s: dropping an incomplete last line (the previous run was interrupted while "
                            "writing it); that file is predicted again", self.path)
                os.truncate(self.path, good)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, obj) -> None:
        self._file.write(json.dumps(to_jsonable(obj), allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
