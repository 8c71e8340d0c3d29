"""Outputs that cannot be written, or must not be replaced, are refused before any work is done, with the
path and what to do; a write that fails at the end keeps the results. Real files and the real CLI."""

from __future__ import annotations

import json
import os
import struct
import sys
import zlib

import numpy as np
import pytest
from odd_names import assert_printable_json, not_utf8
from PIL import Image

from pneumoscan.checkpoint import default_model_path, load_checkpoint, save_checkpoint
from pneumoscan.cli import calibrate_main, evaluate_main, predict_main
from pneumoscan.preprocess import MAX_IMAGE_PIXELS, decode_image


@pytest.fixture
def not_a_folder(tmp_path):
    """A path whose parent is a file: no one, root included, can create anything under it."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    return blocker / "out"


@pytest.fixture(scope="module")
def two_films(tmp_path_factory, train_dir):
    folder = tmp_path_factory.mktemp("films")
    for f in sorted((train_dir / "NORMAL").glob("*.jpeg"))[:2]:
        (folder / f.name).symlink_to(f)
    return folder


def test_predict_refuses_an_unwritable_output_before_predicting(two_films, not_a_folder, capsys):
    assert predict_main(["--image_dir", str(two_films), "--output_path", str(not_a_folder / "r.json"),
                         "--backend", "torch"]) == 2
    captured = capsys.readouterr()
    assert f"cannot write --output_path {not_a_folder / 'r.json'}" in captured.err
    assert "nothing was done yet" in captured.err and "predicting" not in captured.err and captured.out == ""


@pytest.mark.parametrize("target", ["film", "film_without_suffix", "model", "model_without_suffix"])
def test_predict_never_writes_its_results_over_a_film_or_the_model(train_dir, tmp_path, target, capsys):
    import shutil

    films = tmp_path / "films"
    films.mkdir()
    for f in sorted((train_dir / "NORMAL").glob("*.jpeg"))[:2]:
        shutil.copyfile(f, films / f.name)
    first = sorted(films.iterdir())[0]
    from dicom_files import dicom_bytes
    from PIL import Image

    # an input without a suffix, as PACS exports name their DICOM files
    dicom_bytes(films, np.asarray(Image.open(first).convert("L")), filename="IM000001")
    model = tmp_path / ("model.pth" if target == "model" else "model")
    shutil.copyfile(default_model_path(), model)
    out = {"film": first, "film_without_suffix": films / "IM000001", "model": model,
           "model_without_suffix": model}[target]
    before = out.read_bytes()
    assert predict_main(["--image_dir", str(films), "--model_path", str(model), "--output_path", str(out),
                         "--backend", "torch"]) == 2
    err = capsys.readouterr().err
    assert f"--output_path {out}" in err and ".json or .jsonl" in err and "predicting" not in err
    assert out.read_bytes() == before


@pytest.mark.parametrize("case", ["model", "shipped", "report_is_output", "film"])
def test_evaluate_never_writes_over_the_model_a_film_or_its_other_output(train_dir, tmp_path, case, capsys):
    import shutil

    data = tmp_path / "data"
    for cls in ("NORMAL", "PNEUMONIA"):
        (data / cls).mkdir(parents=True)
        for f in sorted((train_dir / cls).glob("*.jpeg"))[:2]:
            shutil.copyfile(f, data / cls / f.name)
    model = tmp_path / "model"  # no suffix: caught as the model, not by its name
    shutil.copyfile(default_model_path(), model)
    film = sorted((data / "NORMAL").iterdir())[0]
    from dicom_files import dicom_bytes

    # a film without a suffix, as PACS exports name DICOM files
    dicom_bytes(data / "NORMAL", np.asarray(Image.open(film).convert("L")), filename="IM000001")
    argv = ["--data_dir", str(data), "--model_path", str(model), "--model_only"]
    out, watched = {
        "model": (["--output_path", str(model)], model),
        "shipped": (["--output_path", str(default_model_path())], default_model_path()),
        "report_is_output": (["--output_path", str(tmp_path / "same"), "--report", str(tmp_path / "same")], None),
        "film": (["--output_path", str(data / "NORMAL" / "IM000001")], data / "NORMAL" / "IM000001"),
    }[case]
    if case == "report_is_output":
        (tmp_path / "same").write_text("{}")
        watched = tmp_path / "same"
    before = watched.read_bytes()
    assert evaluate_main(argv + out) == 2
    err = capsys.readouterr().err
    assert "give a new" in err or "give two paths" in err or "give a .json path" in err, err
    assert watched.read_bytes() == before


def test_predict_refuses_an_unwritable_heatmap_folder(two_films, not_a_folder, capsys):
    assert predict_main(["--image_dir", str(two_films), "--heatmap_dir", str(not_a_folder),
                         "--backend", "torch"]) == 2
    assert "cannot write --heatmap_dir" in capsys.readouterr().err


def test_a_json_that_cannot_be_written_at_the_end_goes_to_stdout(two_films, tmp_path, monkeypatch, capsys):
    import pneumoscan.results

    def disk_full(*args, **kwargs):  # the disk fills up while the folder is predicted (cannot be made real here)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pneumoscan.results, "write_json", disk_full)
    assert predict_main(["--image_dir", str(two_films), "--output_path", str(tmp_path / "r.json"),
                         "--backend", "torch"]) == 2
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)["results"]) == 2  # nothing predicted is lost
    assert "No space left on device" in captured.err and "printed to stdout instead" in captured.err


@pytest.mark.parametrize("flag", ["--output_path", "--report"])
def test_evaluate_refuses_an_unwritable_output_before_reading_films(train_dir, not_a_folder, flag, capsys):
    assert evaluate_main(["--data_dir", str(train_dir), flag, str(not_a_folder / "m.x")]) == 2
    assert f"cannot write {flag}" in capsys.readouterr().err


def test_evaluate_says_a_report_needs_labelled_films(two_films, tmp_path, capsys):
    assert evaluate_main(["--data_dir", str(two_films), "--report", str(tmp_path / "r.html"),
                          "--backend", "torch"]) == 0
    assert "--report is for labelled films" in capsys.readouterr().err and not (tmp_path / "r.html").exists()


def test_calibrate_never_replaces_an_existing_file(train_dir, tmp_path, capsys):
    earlier = tmp_path / "site.pth"
    earlier.write_bytes(b"yesterday's site checkpoint")
    assert calibrate_main(["--data_dir", str(train_dir), "--output_path", str(earlier), "--site", "b"]) == 2
    assert "exists already" in capsys.readouterr().err and earlier.read_bytes() == b"yesterday's site checkpoint"
    assert calibrate_main(["--data_dir", str(train_dir), "--output_path", str(tmp_path / "new.pth"),
                           "--n_boot", "0"]) == 2
    assert "at least 1 bootstrap resample" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["site.jpg", "site.json", "site"])
def test_a_checkpoint_is_written_only_under_a_checkpoint_name(train_dir, tmp_path, capsys, name):
    # a 20 MB checkpoint named site.jpg would later be read, in that folder, as a broken film
    assert calibrate_main(["--data_dir", str(train_dir), "--output_path", str(tmp_path / name)]) == 2
    assert "give a path ending in .pth" in capsys.readouterr().err and not (tmp_path / name).exists()


def test_export_never_writes_over_the_checkpoint_it_exports(tmp_path, capsys):
    pytest.importorskip("onnx")
    from pneumoscan.export import export_main

    mine = tmp_path / "mine.pth"
    save_checkpoint(load_checkpoint(default_model_path()), mine)
    before = mine.read_bytes()
    assert export_main(["--format", "onnx", "--model_path", str(mine), "--output_path", str(mine)]) == 2
    assert "is the checkpoint being exported" in capsys.readouterr().err and mine.read_bytes() == before
    assert export_main(["--format", "onnx", "--output_path", str(default_model_path())]) == 2
    assert "is the shipped model" in capsys.readouterr().err
    other = tmp_path / "other.pth"  # any other checkpoint: an export is ONNX, never a .pth
    other.write_bytes(before)
    assert export_main(["--format", "onnx", "--model_path", str(mine), "--output_path", str(other)]) == 2
    assert "ends in .pth" in capsys.readouterr().err and other.read_bytes() == before


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares its size and holds no pixels: what a decoder sees first."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [12_000, 20_000])
def test_an_oversized_image_says_so_whatever_its_size(side):
    # 12,000 px passes PIL's own bomb limit and meets ours; 20,000 px meets PIL's first: the same message
    with pytest.raises(ValueError, match=f"more than the {MAX_IMAGE_PIXELS} pixels allowed|more than the "
                                         f"{MAX_IMAGE_PIXELS} allowed") as err:
        decode_image(_png_header_only(side, side))
    assert "downsample it first" in str(err.value) and "corrupt" not in str(err.value)


def test_a_mistyped_command_is_named(capsys):
    from pneumoscan.cli import main

    assert main(["predcit", "--image_path", "x.jpg"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'predcit'" in err and "usage: pneumoscan {train,predict" in err


def test_the_check_creates_no_folder_and_leaves_no_probe(tmp_path, train_dir, capsys):
    out = tmp_path / "new" / "deeper" / "m.json"
    assert evaluate_main(["--data_dir", str(train_dir), "--output_path", str(out),
                          "--model_path", str(tmp_path / "missing.pth")]) == 2  # fails after the check
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == []


def test_a_site_checkpoint_with_an_intercept_is_refused_by_an_older_reader_and_exported_with_it(tmp_path):
    """Format 4 marks a calibration intercept (an older pneumoscan would predict without it); the ONNX export's
    metadata carries it, and the ONNX backend applies it."""
    pytest.importorskip("onnxruntime")
    import torch

    from pneumoscan.backends import make_predictor
    from pneumoscan.checkpoint import FORMAT_VERSION
    from pneumoscan.export import export_main, read_metadata

    ckpt = load_checkpoint(default_model_path())
    ckpt.update(calibration_bias=0.7, format_version=4)
    site = tmp_path / "site.pth"
    save_checkpoint(ckpt, site)
    assert FORMAT_VERSION >= 4 and load_checkpoint(site)["format_version"] == 4
    assert export_main(["--format", "onnx", "--model_path", str(site), "--output_path", str(tmp_path / "s.onnx")]) == 0
    assert read_metadata(tmp_path / "s.onnx")["calibration_bias"] == 0.7
    onnx = make_predictor(load_checkpoint(site), "cpu", "onnx")
    logits = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    z = (logits[:, 1] - logits[:, 0]).double()
    assert torch.allclose(onnx.probabilities(logits)[:, 1], torch.sigmoid(z / ckpt["temperature"] + 0.7))


def test_an_exclusive_write_never_replaces_a_file_that_appeared_meanwhile(tmp_path):
    # calibrate checks that its output does not exist before the work, and writes exclusively after it
    target = tmp_path / "site.pth"
    target.write_bytes(b"another run's checkpoint")
    with pytest.raises(FileExistsError):
        save_checkpoint({"x": 1}, target, exclusive=True)
    assert target.read_bytes() == b"another run's checkpoint" and list(tmp_path.iterdir()) == [target]
    save_checkpoint({"x": 1}, tmp_path / "new.pth", exclusive=True)
    assert (tmp_path / "new.pth").stat().st_size > 0


@pytest.mark.parametrize("command, flag", [("predict", "--image_path"), ("predict", "--image_dir"),
                                           ("evaluate", "--data_dir"), ("train", "--data_dir")])
def test_a_path_too_long_to_look_up_is_a_clear_error_not_a_traceback(command, flag, tmp_path, capfd):
    from pneumoscan.cli import main

    argv = [command, flag, "a" * 300 + ".jpg"]
    if command == "train":
        argv += ["--output_dir", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and ("too long" in err.lower()), err[-500:]


@pytest.fixture
def odd_names(tmp_path, train_dir):
    """Films and folders whose names are not UTF-8: ``NORMAL/caf\\xe9.jpeg`` (a real film, a copy),
    ``NORMAL/broken\\xe9.jpeg`` (not an image) and ``PNEUMONIA/``; and ``sub\\xe9/`` with a film, unlabelled."""
    normal, pneumonia = (sorted((train_dir / cls).glob("*.jpeg"))[:3] for cls in ("NORMAL", "PNEUMONIA"))
    labelled = tmp_path / "labelled"
    for cls, films in (("NORMAL", normal), ("PNEUMONIA", pneumonia)):
        (labelled / cls).mkdir(parents=True)
        for f in films:
            (labelled / cls / f.name).symlink_to(f)
    not_utf8(labelled / "NORMAL", b"caf\xe9.jpeg").write_bytes(normal[0].read_bytes())
    not_utf8(labelled / "NORMAL", b"broken\xe9.jpeg").write_bytes(b"not an image")
    unlabelled = not_utf8(tmp_path / "unlabelled", b"sub\xe9")
    unlabelled.mkdir(parents=True)
    (unlabelled / normal[1].name).symlink_to(normal[1])
    (unlabelled.parent / normal[2].name).symlink_to(normal[2])
    return labelled, unlabelled.parent


def test_evaluate_shows_and_writes_names_that_are_not_utf8(odd_names, tmp_path, capsys):
    # capsys's stdout is strict UTF-8, as PYTHONIOENCODING=utf-8 makes it
    out = tmp_path / "m.json"
    assert evaluate_main(["--data_dir", str(odd_names[0]), "--output_path", str(out), "--model_only",
                          "--n_boot", "20"]) == 1  # a film left out
    said = capsys.readouterr().out
    assert ("left out: 2 file(s), in none of the numbers above (1 duplicate, 1 unreadable: broken\\xe9.jpeg, "
            "caf\\xe9.jpeg;") in said  # the copy counted once is listed too
    skipped = json.loads(assert_printable_json(out))["skipped_files"]
    assert [s["path"] for s in skipped] == [str(odd_names[0] / "NORMAL" / name)
                                            for name in ("broken\\xe9.jpeg", "caf\\xe9.jpeg")]


def test_the_scope_report_shows_and_writes_folder_names_that_are_not_utf8(odd_names, tmp_path, capsys):
    out = tmp_path / "scope.json"
    assert evaluate_main(["--data_dir", str(odd_names[1]), "--output_path", str(out), "--backend", "torch"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.split()}
    assert len(rows["sub\\xe9"]) == len(rows["all"])  # the column still lines up
    assert "sub\\xe9" in json.loads(assert_printable_json(out))["by_folder"]


def test_predict_shows_and_writes_names_that_are_not_utf8(odd_names, tmp_path, capsys):
    out, heatmaps = tmp_path / "r.json", tmp_path / "heatmaps"
    assert predict_main(["--image_dir", str(odd_names[0] / "NORMAL"), "--output_path", str(out), "--heatmap_dir",
                         str(heatmaps), "--backend", "torch"]) == 1  # broken\xe9.jpeg
    document = json.loads(assert_printable_json(out))
    cafe = [r for r in document["results"] if r["image_path"].endswith("/caf\\xe9.jpeg")]
    assert len(cafe) == 1 and document["errors"][0]["image_path"].endswith("/broken\\xe9.jpeg")
    assert cafe[0]["heatmap_path"] and not cafe[0]["warnings"]  # written, under the film's own name
    (heatmap,) = heatmaps.glob("caf*")
    assert os.fsencode(heatmap.name).startswith(b"caf\xe9_")  # the film's bytes, \xNN in the JSON
    assert cafe[0]["heatmap_path"] == str(heatmaps / "caf\\xe9") + heatmap.name[4:]


def test_predict_s_summary_on_a_terminal_shows_a_name_that_is_not_utf8(odd_names, monkeypatch, capsys):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert predict_main(["--image_path", str(not_utf8(odd_names[0] / "NORMAL", b"caf\xe9.jpeg")),
                         "--backend", "torch"]) == 0
    assert "/caf\\xe9.jpeg: NORMAL (P(PNEUMONIA) = " in capsys.readouterr().out


@pytest.fixture
def home(tmp_path, monkeypatch):
    """HOME is a fresh folder, and the working folder another: a ``~`` left unexpanded writes to ./~/."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    yield tmp_path / "home"
    assert not (tmp_path / "cwd" / "~").exists(), "a path was written under ./~/"


def _parsers() -> dict:
    from pneumoscan import cli, ensemble, export
    from pneumoscan.serve import cli as serve_cli

    return {"train": cli._train_parser, "predict": cli._predict_parser, "evaluate": cli._evaluate_parser,
            "calibrate": cli._calibrate_parser, "export": export._export_parser, "ensemble": ensemble._ensemble_parser,
            "serve": serve_cli._serve_parser, "audit": serve_cli._audit_parser}


@pytest.mark.parametrize("command, flags", [
    ("train", ["--data_dir", "--output_dir", "--cache_dir", "--init_from", "--patients"]),
    ("predict", ["--image_dir", "--model_path", "--output_path", "--calibration_dir", "--heatmap_dir"]),
    ("predict", ["--image_path"]),
    ("evaluate", ["--data_dir", "--model_path", "--output_path", "--report", "--cache_dir", "--patients"]),
    ("calibrate", ["--data_dir", "--model_path", "--output_path", "--json", "--cache_dir", "--patients"]),
    ("export", ["--output_path", "--model_path", "--calibration_dir"]),
    ("ensemble", ["--members", "--data_dir", "--output_path", "--cache_dir"]),
    ("serve", ["--model_path", "--audit_db", "--api_key_file"]),
    ("audit", ["--audit_db", "--output_path"]),
])
def test_every_path_flag_expands_a_tilde_the_shell_left(command, flags, home):
    argv = [f"{flag}=~/{flag[2:]}" for flag in flags] + (["--format", "onnx"] if command == "export" else [])
    parser = _parsers()[command]()
    dest = {a.option_strings[-1]: a.dest for a in parser._actions if a.option_strings}
    args = parser.parse_args(argv)
    for flag in flags:
        value = getattr(args, dest[flag])
        assert (value[0] if isinstance(value, list) else value) == str(home / flag[2:]), flag


def test_predict_reads_and_writes_a_tilde_path_at_home(two_films, home):
    (home / "films").symlink_to(two_films)
    assert predict_main(["--image_dir=~/films", "--output_path=~/out/r.json", "--backend", "torch"]) == 0
    assert len(json.loads((home / "out" / "r.json").read_text())["results"]) == 2


def test_evaluate_reads_and_writes_tilde_paths_at_home(two_films, train_dir, home):
    (home / "unlabelled").symlink_to(two_films)  # the scope report's path (list_inputs)
    assert evaluate_main(["--data_dir=~/unlabelled", "--output_path=~/scope.json", "--backend", "torch"]) == 0
    assert json.loads((home / "scope.json").read_text())["all"]["inputs"] == 2
    for cls in ("NORMAL", "PNEUMONIA"):
        (home / "labelled" / cls).mkdir(parents=True)
        for f in sorted((train_dir / cls).glob("*.jpeg"))[:2]:
            (home / "labelled" / cls / f.name).symlink_to(f)
    assert evaluate_main(["--data_dir=~/labelled", "--output_path=~/m.json", "--report=~/R.html", "--model_only",
                          "--n_boot", "20"]) == 0
    assert json.loads((home / "m.json").read_text())["n"] == 4 and (home / "R.html").stat().st_size > 0


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_an_output_name_near_the_file_name_limit_is_written(two_films, tmp_path, suffix, capsys):
    """The hidden files beside it (temporary file, lock) get a shortened stem; they used to be too long to create."""
    out = tmp_path / ("é" * 60 + "r" * (250 - 120 - len(suffix)) + suffix)  # 250 bytes: a valid name
    assert len(os.fsencode(out.name)) == 250
    assert predict_main(["--image_dir", str(two_films), "--output_path", str(out), "--backend", "torch"]) == 0
    text = out.read_text()
    assert (len(json.loads(text)["results"]) if suffix == ".json" else len(text.splitlines())) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary or lock file left


def test_an_output_name_longer_than_a_file_name_can_be_is_refused_before_predicting(two_films, tmp_path, capsys):
    out = tmp_path / ("r" * 256 + ".json")
    assert predict_main(["--image_dir", str(two_films), "--output_path", str(out), "--backend", "torch"]) == 2
    err = capsys.readouterr().err
    assert "261 bytes long" in err and "give a shorter one" in err and "Traceback" not in err


def test_short_names_fit_keep_their_start_and_stay_apart():
    from pneumoscan.atomic import NAME_MAX, SIBLING_RESERVE, short_name

    assert short_name("results.jsonl") == "results.jsonl"
    a, b = "x" * 240 + "a.jsonl", "x" * 240 + "b.jsonl"
    for name in (a, b, "ü" * 120, "é" * 95 + "\udce9"):  # multi-byte characters, a byte that is not UTF-8
        short = short_name(name)
        assert len(os.fsencode(short)) + SIBLING_RESERVE <= NAME_MAX and short == short_name(name)
        assert short.startswith(name[:50])
    assert short_name(a) != short_name(b)
