"""Helpers shared by the benchmark scripts (not part of the package)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def machine() -> str:
    """A one-line description of where a number was measured."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return (f"{os.cpu_count()} cores ({cpu}){gpu}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def subset(src: Path, dst: Path, per_class: int) -> Path:
    """``dst/train/{NORMAL,PNEUMONIA}`` holding symlinks to the first ``per_class`` files of each class."""
    for cls in ("NORMAL", "PNEUMONIA"):
        out = dst / "train" / cls
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted((src / "train" / cls).iterdir())[:per_class]:
            link = out / f.name
            if not link.exists():
                link.symlink_to(f.resolve())
    return dst


def git_revision() -> str:
    """The commit measured, with "+uncommitted" when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}+uncommitted" if changed else head


def emit(result: dict, summary: str, json_path: str | None) -> None:
    """Print a benchmark's numbers (with machine and revision) and its one-line summary; save them as JSON."""
    result = {**result, "machine": machine(), "revision": git_revision()}
    print(json.dumps(result, indent=2))
    print(summary)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
