"""The scripts in benchmarks/ and experiments/ still run against today's package, and the commands
docs/benchmarks.md and docs/experiments.md cite still name existing scripts and flags.

Nothing is measured or trained here: every script with a command line is run with ``--help``, which
executes its imports and builds its parser. The runs happen in one child process (torch is imported
once, not once per script), each with its own ``sys.path`` and a fresh copy of the sibling modules it
imports, as ``python SCRIPT --help`` would give it.
"""

from __future__ import annotations

import json
import py_compile
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT_DIRS = (REPO / "benchmarks", REPO / "experiments")
PY_SCRIPTS = sorted(p for d in SCRIPT_DIRS for p in d.glob("*.py"))
SH_SCRIPTS = sorted(p for d in SCRIPT_DIRS for p in d.glob("*.sh"))
CLI_SCRIPTS = [p for p in PY_SCRIPTS if "parse_args" in p.read_text()]
DOCS = (REPO / "docs" / "benchmarks.md", REPO / "docs" / "experiments.md")
SUBCOMMANDS = ("train", "predict", "evaluate", "calibrate", "ensemble", "export", "serve", "audit")

# Runs each target's --help and records the option strings of the parser it reached.
CHILD = r"""
import argparse, json, runpy, sys, traceback
targets, out, dirs = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
flags, results = [], {}
original = argparse.ArgumentParser.parse_known_args
def recording(self, args=None, namespace=None):
    flags.extend(s for a in self._actions for s in a.option_strings)
    return original(self, args, namespace)
argparse.ArgumentParser.parse_known_args = recording
base_path, base_modules = list(sys.path), set(sys.modules)
for name, kind, target in targets:
    flags.clear()
    sys.path[:] = ([target.rsplit("/", 1)[0]] if kind == "script" else []) + base_path
    for mod in [m for m in sys.modules if m not in base_modules
                and any(d in (getattr(sys.modules[m], "__file__", None) or "") for d in dirs)]:
        del sys.modules[mod]
    sys.argv = [target, *([name] if kind == "module" else []), "--help"]
    code, error = None, None
    try:
        if kind == "script":
            runpy.run_path(target, run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        code, error = 1, traceback.format_exc()
    results[name] = {"code": code, "error": error, "flags": sorted(set(flags))}
open(out, "w").write(json.dumps(results))
"""


@pytest.fixture(scope="module")
def helps(tmp_path_factory) -> dict[str, dict]:
    """``{name: {code, error, flags}}`` for every CLI script (by repo-relative path) and ``pneumoscan CMD``."""
    targets = [[str(p.relative_to(REPO)), "script", str(p)] for p in CLI_SCRIPTS]
    targets += [[cmd, "module", "pneumoscan"] for cmd in SUBCOMMANDS]
    out = tmp_path_factory.mktemp("helps") / "helps.json"
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(targets), str(out),
                           json.dumps([str(d) for d in SCRIPT_DIRS])],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.exists(), f"the --help runs did not finish: {proc.stderr[-3000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("script", PY_SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_script_compiles(script, tmp_path):
    py_compile.compile(str(script), cfile=str(tmp_path / "x.pyc"), doraise=True)


@pytest.mark.parametrize("script", SH_SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shell_script_parses(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", CLI_SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_script_answers_help(helps, script):
    run = helps[str(script.relative_to(REPO))]
    assert run["code"] == 0, run["error"] or f"--help exited with {run['code']}"
    assert "--help" in run["flags"], "--help exited before reaching an argparse parser"


def _command_spans(text: str) -> list[tuple[int, str]]:
    """(line, text) of every code-block line (continuations joined) and every inline code span."""
    spans = []
    for m in re.finditer(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        first, held = text[:m.start()].count("\n") + 2, ""
        for i, line in enumerate(m.group(1).split("\n")):
            held += " " + line.split("  #")[0]
            if not held.endswith("\\"):
                spans.append((first + i, held))
                held = ""
            held = held.removesuffix("\\")
    prose = re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    spans += [(prose[:m.start()].count("\n") + 1, m.group(1)) for m in re.finditer(r"`([^`]+)`", prose)]
    return [(line, " ".join(span.replace("\\\n", " ").split())) for line, span in spans]


def _cited_commands(doc: Path) -> list[tuple[int, str, str]]:
    """(line, target, the words after it up to the next command) for each script or subcommand cited."""
    known = {p.name: str(p.relative_to(REPO)) for p in PY_SCRIPTS + SH_SCRIPTS}
    commands = []
    for line, span in _command_spans(doc.read_text()):
        pattern = r"(?:python3? |bash |\b(?:benchmarks|experiments)/)((?:\w+/)*\w+\.(?:py|sh))|\bpneumoscan (\w+)"
        for m in re.finditer(pattern, span):
            rest = re.split(r"\s(?:&&|;|\||then)\s|(?:python3?|bash|pneumoscan) ", span[m.end():])[0]
            if m.group(1):
                name = Path(m.group(1)).name
                if name in ("train_medical_model.py", "run_inference.py"):  # the seed's scripts: test_readme.py
                    continue
                commands.append((line, known.get(name, m.group(1)), rest))
            elif m.group(2) in SUBCOMMANDS:
                commands.append((line, m.group(2), rest))
    return commands


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_the_docs_cite_scripts_and_flags_that_exist(helps, doc):
    problems, checked = [], 0
    for line, target, rest in _cited_commands(doc):
        where = f"{doc.name}:{line}: {target}"
        if target.endswith((".py", ".sh")) and not (REPO / target).exists():
            problems.append(f"{where}: no such script")
            continue
        if target.endswith("cv_table.py"):  # its arguments are the reports it tabulates
            problems += [f"{where}: no {f}" for f in re.findall(r"docs/cv/\w+\.json", rest) if not (REPO / f).exists()]
        if target not in helps:
            continue
        unknown = [f for f in re.findall(r"(?<![\w-])--[A-Za-z]\w*", rest) if f not in helps[target]["flags"]]
        problems += [f"{where}: no flag {f}" for f in unknown]
        checked += 1
    assert not problems, "\n".join(problems)
    assert checked >= 5
