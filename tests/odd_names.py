"""File names that are not UTF-8, as Windows zip archives leave them (Latin-1 or CP437 bytes)."""

from __future__ import annotations

import os
from pathlib import Path


def not_utf8(folder: Path, name: bytes) -> Path:
    """``folder / name`` for a name of raw bytes, as Python sees it (the odd bytes as surrogate escapes)."""
    return Path(os.fsdecode(os.fsencode(folder) + b"/" + name))


def assert_printable_json(path: Path) -> str:
    """The text of a JSON (or JSON Lines) file, checked to hold no surrogate escapes (``\\udcNN``), which
    strict JSON readers refuse; returns the text."""
    text = path.read_text(encoding="utf-8")
    assert "\\udc" not in text, f"{path} holds surrogate escapes"
    return text
