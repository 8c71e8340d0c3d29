"""The README's commands are true: the two opening commands run, and every example parses."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from pneumoscan import cli

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _code_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def _commands() -> list[str]:
    lines = []
    for block in _code_blocks():
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line:
                lines.append(line)
    return lines


def test_readme_opens_with_the_two_commands():
    first = [ln.split("#")[0].strip() for ln in _code_blocks()[0].splitlines() if ln.strip()]
    assert README.lstrip().startswith("# pneumoscan\n\n```bash")
    assert first[0].startswith("make train DATA=")
    assert first[1] == "make test"
    dry = subprocess.run(["make", "-n", "train", "DATA=/some/data"], cwd=REPO, capture_output=True, text=True)
    assert dry.returncode == 0 and "pneumoscan train --data_dir /some/data" in dry.stdout
    dry = subprocess.run(["make", "-n", "test"], cwd=REPO, capture_output=True, text=True)
    assert dry.returncode == 0 and "pytest" in dry.stdout


@pytest.mark.slow
@pytest.mark.skipif(not (REPO / ".venv" / ".installed").exists(), reason="run through `make test` (needs .venv)")
def test_main_command_trains(tmp_path, smoke_data):
    out = tmp_path / "out"
    proc = subprocess.run(["make", "train", f"DATA={smoke_data}", f"OUT={out}",
                           f"ARGS=--epochs 1 --image_size 64 --cache_dir {tmp_path / 'cache'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "medical_cnn_model.pth").is_file() and (out / "training_summary.txt").is_file()


PARSERS = {
    ("python", "train_medical_model.py"): cli._train_parser,
    ("python", "run_inference.py"): cli._predict_parser,
    ("pneumoscan", "train"): cli._train_parser,
    ("pneumoscan", "predict"): cli._predict_parser,
    ("pneumoscan", "evaluate"): cli._evaluate_parser,
}


def test_every_example_command_parses():
    checked = 0
    for line in _commands():
        words = shlex.split(line)
        key = tuple(words[:2])
        if key in PARSERS:
            PARSERS[key]().parse_args(words[2:])  # exits (SystemExit) on an unknown flag or bad value
            checked += 1
    assert checked >= 10
