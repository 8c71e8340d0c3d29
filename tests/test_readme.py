"""The README's commands are true: the opening commands run, and every example parses."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from pneumoscan import cli
from pneumoscan.serve import cli as serve_cli

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


def test_readme_opens_with_serve_then_test():
    first = [ln.split("#")[0].strip() for ln in _code_blocks()[0].splitlines() if ln.strip()]
    assert README.lstrip().startswith("# pneumoscan\n\n```bash")
    assert first[0] == "make serve"
    assert first[1] == "make test"
    assert first[2].startswith("make train DATA=")
    dry = subprocess.run(["make", "-n", "serve"], cwd=REPO, capture_output=True, text=True)
    assert dry.returncode == 0 and re.search(r"^\S*/bin/pneumoscan serve\s*$", dry.stdout, flags=re.M), dry.stdout
    assert "http://127.0.0.1:8000" in _code_blocks()[0]
    dry = subprocess.run(["make", "-n", "test"], cwd=REPO, capture_output=True, text=True)
    assert dry.returncode == 0 and "pytest" in dry.stdout
    dry = subprocess.run(["make", "-n", "train", "DATA=/some/data"], cwd=REPO, capture_output=True, text=True)
    assert dry.returncode == 0 and "pneumoscan train --data_dir /some/data" in dry.stdout


@pytest.mark.slow
@pytest.mark.skipif(not (REPO / ".venv" / ".installed").exists(), reason="run through `make test` (needs .venv)")
def test_main_command_trains(tmp_path, smoke_data):
    out = tmp_path / "out"
    proc = subprocess.run(["make", "train", f"DATA={smoke_data}", f"OUT={out}",
                           f"ARGS=--epochs 1 --image_size 64 --cache_dir {tmp_path / 'cache'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "medical_cnn_model.pth").is_file() and (out / "training_summary.txt").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not (REPO / ".venv" / ".installed").exists(), reason="run through `make test` (needs .venv)")
def test_main_command_serves(tmp_path):
    from serve_process import free_port

    port = free_port()
    proc = subprocess.Popen(["make", "serve", f"ARGS=--port {port} --audit_db {tmp_path / 'audit.sqlite3'}"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
        assert page.status_code == 200 and "pneumoscan" in page.text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


PARSERS = {
    ("python", "train_medical_model.py"): cli._train_parser,
    ("python", "run_inference.py"): cli._predict_parser,
    ("pneumoscan", "train"): cli._train_parser,
    ("pneumoscan", "predict"): cli._predict_parser,
    ("pneumoscan", "evaluate"): cli._evaluate_parser,
    ("pneumoscan", "serve"): serve_cli._serve_parser,
    ("pneumoscan", "audit"): serve_cli._audit_parser,
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


@pytest.mark.parametrize("flag", ["--arch", "--loss", "--augment", "--intensity"])
def test_listed_choices_are_the_cli_choices(flag):
    """The README's "`--flag a | b | c`" lists name exactly the choices `pneumoscan train` accepts."""
    listed = re.search(rf"`{flag} ([\w ]+(?:\|[\w ]+)+)`", " ".join(README.split()))
    assert listed, f"README lists no choices for {flag}"
    action = next(a for a in cli._train_parser()._actions if flag in a.option_strings)
    assert sorted(c.strip() for c in listed.group(1).split("|")) == sorted(action.choices)
