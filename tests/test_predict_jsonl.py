"""Large folders: JSON Lines written as it goes, --resume after an interruption, every listed file accounted for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from odd_names import assert_printable_json, not_utf8

from pneumoscan.cli import predict_main
from pneumoscan.inference import list_inputs
from pneumoscan.results import JsonlWriter, scan_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folder(tmp_path_factory, smoke_files):
    """Twelve real radiographs, a broken link, a pipe, a text file named .jpg, a non-image file."""
    root = tmp_path_factory.mktemp("jsonl_in")
    (root / "sub").mkdir()
    for i, path in enumerate(smoke_files["NORMAL"][:6] + smoke_files["PNEUMONIA"][:6]):
        (root / ("sub" if i % 3 == 0 else "") / path.name).symlink_to(path)
    (root / "broken.jpeg").symlink_to(root / "does-not-exist.jpeg")
    os.mkfifo(root / "pipe.jpg")
    (root / "notes.jpg").write_text("not an image")
    (root / "README.txt").write_text("ignored: not an image name")
    return root


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def run(folder, out, model, *extra) -> int:
    return predict_main(["--image_dir", str(folder), "--output_path", str(out), "--model_path", str(model),
                         "--device", "cpu", "--batch_size", "4", *extra])


def test_every_listed_file_gets_one_line(folder, tmp_path, trained_model):
    out = tmp_path / "r.jsonl"
    assert run(folder, out, trained_model) == 1  # some files failed
    lines = read_lines(out)
    listed = [str(p) for p in list_inputs(folder)]
    assert [line["image_path"] for line in lines] == listed  # listing order, each once
    errors = {os.path.basename(line["image_path"]): line["error"] for line in lines if "error" in line}
    assert "broken symbolic link" in errors["broken.jpeg"]
    assert "not a regular file" in errors["pipe.jpg"]
    assert "not a recognised image" in errors["notes.jpg"]
    results = [line for line in lines if "error" not in line]
    assert len(results) + len(errors) == 15 and len(results) >= 10  # the gate may refuse the odd real film
    assert all(set(r["probabilities"]) == {"NORMAL", "PNEUMONIA"} for r in results)


def test_existing_output_is_never_overwritten(folder, tmp_path, trained_model):
    out = tmp_path / "r.jsonl"
    out.write_text('{"image_path": "x"}\n')
    assert run(folder, out, trained_model) == 2
    assert out.read_text() == '{"image_path": "x"}\n'


def test_resume_after_a_kill_mid_line_equals_a_full_run(folder, tmp_path, trained_model):
    full = tmp_path / "full.jsonl"
    run(folder, full, trained_model)
    lines = full.read_text().splitlines(keepends=True)
    part = tmp_path / "part.jsonl"
    part.write_text("".join(lines[:5]) + lines[5][:40])  # killed while writing line 6
    assert run(folder, part, trained_model, "--resume") == 1
    resumed, complete = read_lines(part), read_lines(full)
    assert sorted(r["image_path"] for r in resumed) == sorted(r["image_path"] for r in complete)
    by_path = {r["image_path"]: r for r in complete}
    for r in resumed:
        ref = by_path[r["image_path"]]
        assert r.get("prediction") == ref.get("prediction") and r.get("error_type") == ref.get("error_type")
        if "probabilities" in r:
            assert r["probabilities"]["PNEUMONIA"] == pytest.approx(ref["probabilities"]["PNEUMONIA"], abs=1e-6)
    assert run(folder, part, trained_model, "--resume") == 0  # nothing left to do
    assert len(read_lines(part)) == len(complete)


def test_resume_knows_a_folder_however_it_is_spelled(folder, tmp_path, trained_model, monkeypatch):
    out = tmp_path / "r.jsonl"
    monkeypatch.chdir(folder.parent)
    run(folder.name, out, trained_model)  # a relative --image_dir
    before = read_lines(out)
    assert run(folder, out, trained_model, "--resume") == 0  # the same folder, absolute: nothing left to do
    assert read_lines(out) == before


def test_resume_with_another_threshold_or_model_is_refused(folder, tmp_path, trained_model, capsys):
    out = tmp_path / "r.jsonl"
    run(folder, out, trained_model)
    before = out.read_bytes()
    assert run(folder, out, trained_model, "--resume", "--threshold", "0.99") == 2
    assert "resume with the same --model_path and --threshold" in capsys.readouterr().err
    assert out.read_bytes() == before
    from pneumoscan.checkpoint import default_model_path

    assert run(folder, out, default_model_path(), "--resume") == 2  # another model
    assert "holds results of model" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_a_damaged_line_before_good_ones_is_reported_not_cut_away(folder, tmp_path, trained_model, capsys):
    out = tmp_path / "r.jsonl"
    run(folder, out, trained_model)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:3]) + "{not json\n" + "".join(lines[3:]))
    before = out.read_bytes()
    assert run(folder, out, trained_model, "--resume") == 2
    assert "line 4 is not a complete result" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_one_process_resumes_the_part_files_of_an_interrupted_torchrun_run(folder, tmp_path, trained_model):
    full = tmp_path / "full.jsonl"
    run(folder, full, trained_model)
    lines = full.read_text().splitlines(keepends=True)
    out = tmp_path / "r.jsonl"
    out.write_text("".join(lines[:2]))  # an earlier result file, and a 3-process run's parts, each cut short
    for rank in range(3):
        (tmp_path / f".r.jsonl.rank{rank}-of-3.part").write_text("".join(lines[2 + rank:8:3]) + '{"image_pa')
    gone = tmp_path / "gone.jpeg"  # a film listed in a part then removed from the folder: its line is kept
    (tmp_path / ".r.jsonl.rank0-of-3.part").write_text(
        (tmp_path / ".r.jsonl.rank0-of-3.part").read_text().rsplit("\n", 1)[0] + "\n"
        + json.dumps({**json.loads(lines[0]), "image_path": str(gone)}) + "\n")
    assert run(folder, out, trained_model) == 2  # without --resume: refused, nothing touched
    assert len(list(tmp_path.glob(".r.jsonl.rank*"))) == 3 and out.read_text() == "".join(lines[:2])
    assert run(folder, out, trained_model, "--resume") == 1  # the folder's broken files
    merged = [json.loads(line)["image_path"] for line in out.read_text().splitlines()]
    listed = [json.loads(line)["image_path"] for line in lines]
    assert merged[:8] == listed[:8]  # the results already there, the parts' in listing order
    assert merged[8] == str(gone) and merged[9:] == listed[8:]  # then the unlisted one; the rest predicted
    assert list(tmp_path.glob(".r.jsonl.rank*")) == []
    assert out.read_text().splitlines(keepends=True)[:8] == lines[:8]  # earlier results kept byte for byte


def test_part_files_without_resume_are_refused_not_left_behind(folder, tmp_path, trained_model, capsys):
    (tmp_path / ".r.jsonl.rank0-of-2.part").write_text('{"image_path": "x"}\n')
    assert run(folder, tmp_path / "r.jsonl", trained_model) == 2
    assert "part files of an interrupted run" in capsys.readouterr().err and not (tmp_path / "r.jsonl").exists()
    assert (tmp_path / ".r.jsonl.rank0-of-2.part").read_text() == '{"image_path": "x"}\n'


def test_a_second_run_on_the_same_output_is_refused_while_the_first_holds_it(folder, tmp_path, trained_model, capsys):
    from pneumoscan.atomic import output_lock

    out = tmp_path / "r.jsonl"
    (tmp_path / ".r.jsonl.rank0-of-2.part").write_text('{"image_path": "x"}\n')  # the first run's live part
    with output_lock(out):  # as the first run holds it (another process: the same flock)
        assert run(folder, out, trained_model, "--resume") == 2
    assert "another run is writing" in capsys.readouterr().err
    assert (tmp_path / ".r.jsonl.rank0-of-2.part").exists() and not out.exists()  # its part neither folded nor gone
    assert not (tmp_path / ".r.jsonl.lock").exists()


def test_an_output_on_a_file_system_without_locks_is_still_written(folder, tmp_path, trained_model, monkeypatch,
                                                                    capsys):
    import errno
    import fcntl

    def no_locks(fd, op):  # what flock says on a network share without lock support
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert run(folder, tmp_path / "r.jsonl", trained_model) == 1  # the folder's broken files; the rest written
    assert len(read_lines(tmp_path / "r.jsonl")) == 15
    assert "cannot be locked (No locks available)" in capsys.readouterr().err


def test_the_parts_of_a_json_run_are_not_those_of_a_jsonl_run_of_the_same_stem(folder, tmp_path, trained_model):
    (tmp_path / ".r.json.rank0-of-2.part").write_text('{"image_path": "elsewhere.jpeg"}\n')
    assert run(folder, tmp_path / "r.jsonl", trained_model, "--resume") == 1
    assert "elsewhere" not in (tmp_path / "r.jsonl").read_text()  # not taken in
    assert (tmp_path / ".r.json.rank0-of-2.part").exists()  # nor removed


def test_resume_refuses_part_files_of_another_model_and_changes_nothing(folder, tmp_path, trained_model, capsys):
    out = tmp_path / "r.jsonl"
    run(folder, out, trained_model)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:3]))
    other = {**json.loads(lines[5]), "threshold": 0.99}
    (tmp_path / ".r.jsonl.rank1-of-2.part").write_text(json.dumps(other) + "\n")
    assert run(folder, out, trained_model, "--resume") == 2
    assert "at threshold 0.99" in capsys.readouterr().err
    assert out.read_text() == "".join(lines[:3]) and (tmp_path / ".r.jsonl.rank1-of-2.part").exists()


def test_resume_needs_jsonl(folder, tmp_path, trained_model):
    with pytest.raises(SystemExit) as info:
        run(folder, tmp_path / "r.json", trained_model, "--resume")
    assert info.value.code == 2


def test_lines_are_flushed_as_they_are_written(tmp_path):
    path = tmp_path / "w.jsonl"
    writer = JsonlWriter(path)
    writer.write({"image_path": "a", "p": float("nan")})
    assert scan_jsonl(path) == ({"a"}, len(path.read_bytes()))  # visible before close
    assert read_lines(path)[0]["p"] is None
    writer.close()


def test_progress_bar_is_quiet_without_a_terminal(folder, tmp_path, trained_model):
    proc = subprocess.run([sys.executable, "-m", "pneumoscan", "predict", "--image_dir", str(folder),
                           "--output_path", str(tmp_path / "r.jsonl"), "--model_path", str(trained_model),
                           "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "img/s" not in proc.stderr and "it/s" not in proc.stderr


def test_output_grows_while_the_run_is_going(tmp_path, trained_model, smoke_files):
    """Lines appear before the run ends (a crash loses at most the batch in flight)."""
    src = tmp_path / "many"
    src.mkdir()
    files = smoke_files["NORMAL"] + smoke_files["PNEUMONIA"]
    for i in range(400):
        (src / f"{i:04d}_{files[i % len(files)].name}").symlink_to(files[i % len(files)])
    out = tmp_path / "r.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "pneumoscan", "predict", "--image_dir", str(src),
                             "--output_path", str(out), "--model_path", str(trained_model), "--device", "cpu",
                             "--batch_size", "8"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        seen_partial = False
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            n = len(out.read_text().splitlines()) if out.exists() else 0
            if 0 < n < 400:
                seen_partial = True
                break
            time.sleep(0.05)
    finally:
        proc.wait(timeout=120)
    assert seen_partial, "no partial output observed: results were not written as they came"
    assert len(read_lines(out)) == 400


def test_names_that_are_not_utf8_are_written_printable_and_resumed(tmp_path, smoke_files):
    films = tmp_path / "films"
    films.mkdir()
    for i, path in enumerate(smoke_files["NORMAL"][:3]):
        not_utf8(films, b"caf\xe9%d.jpeg" % i).symlink_to(path)
    out = tmp_path / "r.jsonl"
    argv = ["--image_dir", str(films), "--output_path", str(out), "--backend", "torch"]
    assert predict_main(argv) == 0
    assert_printable_json(out)
    assert [line["image_path"] for line in read_lines(out)] == [str(films / f"caf\\xe9{i}.jpeg") for i in range(3)]
    before = out.read_bytes()
    assert predict_main([*argv, "--resume"]) == 0  # each file known by its printable name: none predicted again
    assert out.read_bytes() == before
