"""torchrun with 2 CPU processes (gloo): DDP training with rank-0 outputs and --resume; sharded prediction."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pneumoscan.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def torchrun(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run([*TORCHRUN, "-m", "pneumoscan", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, smoke_data, smoke_args):
    root = tmp_path_factory.mktemp("ddp")
    out = root / "out"
    args = ["train", "--data_dir", str(smoke_data), "--output_dir", str(out), "--cache_dir", str(root / "cache"),
            "--width", "0.25", *smoke_args]
    proc = torchrun(*args, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, out, args, proc


def test_ddp_training_writes_outputs_once_from_rank_0(ddp_run):
    _, out, _, proc = ddp_run
    results = json.loads((out / "training_results.json").read_text())
    assert results["world_size"] == 2 and results["distributed"]["backend"] == "gloo"
    assert results["distributed"]["global_batch_size"] == 2 * results["config"]["batch_size"]
    assert len(results["history"]) == 1
    log = (out / "training.log").read_text()
    assert log.count("Epoch 1/1 - Train Loss") == 1  # rank 0 alone logs to the file
    assert "rank 0 of 2 (gloo)" in log and "rank 1 of 2" not in log
    ckpt = load_checkpoint(out / "medical_cnn_model.pth")
    assert ckpt["temperature"] is not None and ckpt["ood_gate"] is not None
    assert ckpt["ood_gate"]["min_detail"] > 0  # the detail floor is fitted on the training films
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no temp files left


def test_ddp_resume_continues_from_the_last_epoch(ddp_run):
    root, out, args, _ = ddp_run
    args = [a if a != "1" or args[i - 1] != "--epochs" else "2" for i, a in enumerate(args)]
    proc = torchrun(*args, "--resume", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "training_results.json").read_text())
    assert [h["epoch"] for h in results["history"]] == [1, 2]
    assert "resumed from" in (out / "training.log").read_text()


def test_ddp_resume_with_only_the_flags_it_needs_continues_rank_0_s_recipe_on_every_rank(ddp_run, tmp_path):
    """The run's own flags (64 px, width 0.25, batch 16) come from rank 0's checkpoint_last.pth on every rank: rank 1
    here cannot read the file, as on a node without it (before, each rank built its config from its own disk, and
    the ranks trained different networks)."""
    root, out, args, _ = ddp_run
    resumed = tmp_path / "out"
    shutil.copytree(out, resumed)
    wrapper = tmp_path / "rank_1_without_the_file.py"
    wrapper.write_text(
        "import os, sys\n"
        "from pneumoscan import train\n"
        "if os.environ.get('RANK') == '1':\n"
        "    def unreadable(path, *a, **k):\n"
        "        raise OSError(f'rank 1 read {path}')\n"
        "    train.load_checkpoint = unreadable\n"
        "from pneumoscan.__main__ import main\n"
        "sys.exit(main())\n")
    data, cache = args[args.index("--data_dir") + 1], args[args.index("--cache_dir") + 1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([*TORCHRUN, str(wrapper), "train", "--data_dir", data, "--output_dir", str(resumed),
                           "--cache_dir", cache, "--device", "cpu", "--epochs", "2", "--resume"], cwd=root,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((resumed / "training_results.json").read_text())
    assert [h["epoch"] for h in results["history"]] == [1, 2]
    assert (results["config"]["image_size"], results["config"]["width"], results["config"]["batch_size"]) == (
        64, 0.25, 16)


def test_ddp_an_error_on_rank_0_stops_every_rank_with_its_message(ddp_run):
    # rank 0 reads checkpoint_last.pth for everyone: when it is missing, the other rank must not wait
    # for it until the process group's 30-minute timeout
    root, out, args, _ = ddp_run
    empty = root / "empty"
    args = [str(empty) if a == str(out) else a for a in args]
    proc = torchrun(*args, "--resume", cwd=root, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("--resume: no checkpoint_last.pth") == 2, proc.stderr[-3000:]  # both ranks say why
    assert "no checkpoint_last.pth" in (empty / "training.log").read_text()


def test_ddp_fine_tunes_from_rank_0s_checkpoint(ddp_run):
    root, out, args, _ = ddp_run
    tuned = root / "tuned"
    args = [str(tuned) if a == str(out) else a for a in args]
    proc = torchrun(*args, "--init_from", str(out / "medical_cnn_model.pth"), cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fine-tuning from" in (tuned / "training.log").read_text()
    source, result = load_checkpoint(out / "medical_cnn_model.pth"), load_checkpoint(tuned / "medical_cnn_model.pth")
    assert result["input_spec"]["mean"] == source["input_spec"]["mean"]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_sharded_prediction_equals_a_single_process_run(tmp_path, trained_model, smoke_files, suffix):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    files = smoke_files["NORMAL"][:5] + smoke_files["PNEUMONIA"][:6]
    for i, f in enumerate(files):
        (folder / ("sub" if i % 4 == 0 else "") / f.name).symlink_to(f)
    (folder / "broken.jpeg").symlink_to(folder / "missing.jpeg")
    common = ["--image_dir", str(folder), "--model_path", str(trained_model), "--device", "cpu", "--batch_size", "4"]
    single = subprocess.run([sys.executable, "-m", "pneumoscan", "predict", *common,
                             "--output_path", str(tmp_path / f"one{suffix}")], capture_output=True, text=True)
    assert single.returncode == 1, single.stderr[-2000:]  # the broken link
    proc = torchrun("predict", *common, "--output_path", str(tmp_path / f"two{suffix}"), cwd=tmp_path)
    assert proc.returncode != 0 and "exitcode  : 1" in proc.stderr  # rank 0 reports the failed file

    def outcomes(path: Path) -> list[dict]:
        if suffix == ".jsonl":
            return [json.loads(line) for line in path.read_text().splitlines()]
        doc = json.loads(path.read_text())
        return sorted(doc["results"] + doc["errors"], key=lambda o: o["image_path"])

    one, two = outcomes(tmp_path / f"one{suffix}"), outcomes(tmp_path / f"two{suffix}")
    assert [o["image_path"] for o in two] == [o["image_path"] for o in one]  # each file once, same order
    for a, b in zip(one, two):
        assert a.get("prediction") == b.get("prediction") and a.get("error") == b.get("error")
        if "probabilities" in a:
            assert a["probabilities"]["PNEUMONIA"] == pytest.approx(b["probabilities"]["PNEUMONIA"], abs=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # part files merged, removed


def test_a_rank_that_cannot_write_its_share_stops_the_merge_and_keeps_the_other_parts(tmp_path, trained_model,
                                                                                      smoke_files):
    folder = tmp_path / "in"
    folder.mkdir()
    for f in smoke_files["NORMAL"][:4]:
        (folder / f.name).symlink_to(f)
    (tmp_path / ".out.jsonl.rank1-of-2.part").mkdir()  # rank 1's part file cannot be written
    proc = torchrun("predict", "--image_dir", str(folder), "--model_path", str(trained_model), "--device", "cpu",
                    "--output_path", str(tmp_path / "out.jsonl"), cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "Is a directory" in proc.stderr and "1 of 2 rank(s) could not finish their share" in proc.stderr
    assert "Connection closed by peer" not in proc.stderr  # rank 0 did not try to merge and crash
    assert not (tmp_path / "out.jsonl").exists()
    assert len((tmp_path / ".out.jsonl.rank0-of-2.part").read_text().splitlines()) == 2  # rank 0's share is kept


@pytest.mark.parametrize("where", ["while predicting", "while loading the model"])
def test_an_unexpected_error_on_one_rank_stops_every_rank_at_once(tmp_path, trained_model, smoke_files, where):
    """A rank that fails must not wait in the closing barrier while the others wait in their count: that held
    every rank for the process group's timeout (30 min) and hid the error."""
    folder = tmp_path / "in"
    folder.mkdir()
    for f in smoke_files["NORMAL"][:6]:
        (folder / f.name).symlink_to(f)
    # an uncaught error (a CUDA out-of-memory, say) in the share; a reported one (exit 2) before it
    method, error = (("iter_predict", "RuntimeError('injected on rank 1')") if where == "while predicting"
                     else ("__init__", "OSError(5, 'injected on rank 1')"))
    wrapper = tmp_path / "fail_on_rank_1.py"
    wrapper.write_text(
        "import os, sys\n"
        "from pneumoscan import inference\n"
        "def fail(*a, **k):\n"
        f"    raise {error}\n"
        "if os.environ.get('RANK') == '1':\n"
        f"    setattr(inference.MedicalImageInference, {method!r}, fail)\n"
        "from pneumoscan.__main__ import main\n"
        "sys.exit(main())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    started = time.monotonic()
    proc = subprocess.run([*TORCHRUN, str(wrapper), "predict", "--image_dir", str(folder), "--model_path",
                           str(trained_model), "--device", "cpu", "--output_path", str(tmp_path / "out.jsonl")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode != 0 and "injected on rank 1" in proc.stderr
    assert time.monotonic() - started < 90  # seconds, not the 30 min of the group's timeout
    assert not (tmp_path / "out.jsonl").exists()


def test_torchrun_is_installed_with_torch():
    assert shutil.which("torchrun") or (Path(sys.executable).parent / "torchrun").exists()


class _NeedsTwoArgs(Exception):
    def __init__(self, path, why):
        super().__init__(f"{path}: {why}")


@pytest.mark.parametrize("exc, sent", [(ValueError("bad flag"), ValueError("bad flag")),
                                       (_NeedsTwoArgs("x.pth", "truncated"),
                                        RuntimeError("_NeedsTwoArgs: x.pth: truncated"))])
def test_what_rank_0_sends_when_it_fails_can_be_unpickled_by_the_others(exc, sent):
    from pneumoscan.distributed import _outcome

    def fail():
        raise exc

    kind, value, local = _outcome(fail)
    assert kind == "error" and local is exc
    assert type(value) is type(sent) and str(value) == str(sent)
    assert _outcome(lambda: 3) == ("ok", 3, None)


def test_a_sharded_jsonl_run_resumes_with_the_folder_spelled_another_way(tmp_path, trained_model, smoke_files):
    folder = tmp_path / "in"
    folder.mkdir()
    for f in smoke_files["NORMAL"][:3] + smoke_files["PNEUMONIA"][:3]:
        (folder / f.name).symlink_to(f)
    common = ["--model_path", str(trained_model), "--device", "cpu"]
    single = subprocess.run([sys.executable, "-m", "pneumoscan", "predict", "--image_dir", "in", *common,
                             "--output_path", "one.jsonl"], cwd=tmp_path, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    lines = (tmp_path / "one.jsonl").read_text().splitlines(keepends=True)
    # an interrupted 2-rank run with a relative --image_dir: each rank's part holds its first file only
    for rank in range(2):
        (tmp_path / f".two.jsonl.rank{rank}-of-2.part").write_text(lines[rank::2][0])
    proc = torchrun("predict", "--image_dir", str(folder), *common, "--output_path", str(tmp_path / "two.jsonl"),
                    "--resume", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert len(merged) == 6 and [Path(o["image_path"]).name for o in merged] == [
        Path(json.loads(line)["image_path"]).name for line in lines]


def test_a_sharded_resume_takes_a_single_run_s_output_and_another_process_count_s_parts(tmp_path, trained_model,
                                                                                        smoke_files):
    folder = tmp_path / "in"
    folder.mkdir()
    for f in smoke_files["NORMAL"][:4] + smoke_files["PNEUMONIA"][:4]:
        (folder / f.name).symlink_to(f)
    common = ["--image_dir", str(folder), "--model_path", str(trained_model), "--device", "cpu"]
    single = subprocess.run([sys.executable, "-m", "pneumoscan", "predict", *common, "--output_path", "one.jsonl"],
                            cwd=tmp_path, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    lines = (tmp_path / "one.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "two.jsonl").write_text(lines[0])  # a one-process run stopped after its first film,
    for rank in range(3):  # then a 3-process run stopped after one film each
        (tmp_path / f".two.jsonl.rank{rank}-of-3.part").write_text(lines[1 + rank])
    proc = torchrun("predict", *common, "--output_path", "two.jsonl", "--resume", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = (tmp_path / "two.jsonl").read_text().splitlines(keepends=True)
    assert merged[:4] == lines[:4]  # the four finished results kept byte for byte: not predicted again
    assert [json.loads(m)["image_path"] for m in merged] == [json.loads(m)["image_path"] for m in lines]
    assert "4 of 8 file(s) already in two.jsonl; predicting the other 4" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_k_fold_under_torchrun_writes_its_report_and_ensemble_once(tmp_path, smoke_data, smoke_args):
    """Every rank trains the folds together; rank 0 alone scores the out-of-fold films and writes (before, every
    rank scored them again and wrote the report and the ensemble into the same files)."""
    out = tmp_path / "cv"
    wrapper = tmp_path / "rank_1_must_not_score.py"  # rank 1's logging is quiet: this makes its scoring seen
    wrapper.write_text(
        "import os, sys\n"
        "from pneumoscan import cv\n"
        "def scored(*a, **k):\n"
        "    raise RuntimeError('rank 1 scored the out-of-fold films')\n"
        "if os.environ.get('RANK') == '1':\n"
        "    cv.collect_oof = scored\n"
        "from pneumoscan.__main__ import main\n"
        "sys.exit(main())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([*TORCHRUN, str(wrapper), "train", "--data_dir", str(smoke_data), "--output_dir", str(out),
                           "--cache_dir", str(tmp_path / "cache"), "--cv_folds", "2", "--cv_holdout", "--width",
                           "0.25", *smoke_args], cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("2-fold cross-validation by patient") == 1  # one summary: rank 0's
    report = json.loads((out / "cv_results.json").read_text())
    assert [Path(p).parent.name for p in report["folds"]] == ["fold0", "fold1"]
    ensemble = load_checkpoint(out / "medical_cnn_model.pth")
    assert ensemble["arch"] == "ensemble" and ensemble["config"]["ensemble_of"]["folds"] == [0, 1]
    assert ensemble["threshold"] == pytest.approx(report["ensemble_holdout"]["threshold"])
