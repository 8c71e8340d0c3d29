"""Serialising results: the one place dataclasses and metrics become JSON."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .atomic import write_text
from .names import printable

log = logging.getLogger(__name__)


def to_jsonable(obj):
    """Dataclasses, numpy values and paths to plain JSON types; NaN and inf become None; in text, the bytes of
    file names that are not UTF-8 become ``\\xNN`` (``printable``), not surrogates that JSON readers refuse."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {printable(str(k)): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, Path)):
        return printable(str(obj))
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

    Reading stops at a last line that is not a complete JSON object (a run killed while writing leaves at
    most one such line, at the end).

    Raises:
        DataError: a line that is not a complete result comes before others: the file was changed by something
            else than pneumoscan, and cutting it there would throw good results away.
    """
    return _scan_jsonl(path)[:2]


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[bytes, dict]]:
    """(line, object) of every complete line of a pneumoscan JSON Lines file, in order; a last line that is
    not a complete JSON object (a run killed while writing it) is left out.

    Raises:
        DataError: as ``scan_jsonl``.
    """
    from .errors import DataError

    bad_at = None
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            obj = None
            if line.endswith(b"\n"):
                try:
                    obj = json.loads(line)
                except ValueError:
                    obj = None
            if not isinstance(obj, dict):
                bad_at = bad_at or number
                continue
            if bad_at is not None:
                raise DataError(f"{path}: line {bad_at} is not a complete result but later lines are: the file was "
                                f"changed by something else; check it (nothing was removed), or write a new file")
            yield line, obj


def made_with(obj: dict) -> tuple | None:
    """The (model_version, threshold) a result line was made with, or None for a line that names neither."""
    if obj.get("model_version") is None and obj.get("threshold") is None:
        return None
    return obj.get("model_version"), obj.get("threshold")


def _scan_jsonl(path: str | os.PathLike) -> tuple[set[str], int, set[tuple]]:
    """``scan_jsonl``, and the (model_version, threshold) pairs its results were made with."""
    done: set[str] = set()
    pairs: set[tuple] = set()
    good = 0
    for line, obj in iter_jsonl(path):
        if obj.get("image_path") is not None:
            done.add(str(obj["image_path"]))
        if (pair := made_with(obj)) is not None:
            pairs.add(pair)
        good += len(line)
    return done, good, pairs


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
        self.made_with: set[tuple] = set()  # (model_version, threshold) of the results already in the file
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size > 0:
            if not resume:
                raise FileExistsError(f"{self.path} already exists: pass --resume to continue it, or remove it "
                                      f"to start over")
            self.done, good, self.made_with = _scan_jsonl(self.path)
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
