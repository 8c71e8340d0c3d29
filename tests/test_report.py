"""The evaluation report: a self-contained HTML file, rendered by a real headless Chromium."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from odd_names import not_utf8
from PIL import Image

from pneumoscan.browser import find_chromium, screenshot
from pneumoscan.cli import evaluate_main

TRAIN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chest_xray" / "train"
pytestmark = pytest.mark.skipif(not TRAIN.is_dir(), reason=f"real chest X-rays not found at {TRAIN}")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("eval")
    for cls, pattern in (("NORMAL", "*.jpeg"), ("PNEUMONIA", "*bacteria*.jpeg"), ("PNEUMONIA", "*virus*.jpeg")):
        (root / cls).mkdir(exist_ok=True)
        for f in sorted((TRAIN / cls).glob(pattern))[:12]:
            (root / cls / f.name).symlink_to(f)
    out = root / "report.html"
    assert evaluate_main(["--data_dir", str(root), "--report", str(out), "--output_path", str(root / "m.json"),
                          "--n_boot", "200"]) == 0
    return out, json.loads((root / "m.json").read_text())


@pytest.mark.slow
def test_report_is_self_contained_with_every_section(report):
    path, metrics = report
    page = path.read_text()
    for section in ("Metrics at the operating threshold", "ROC and precision-recall curves", "Confusion matrix",
                    "Calibration", "Threshold table", "Sensitivity by pneumonia type", "Most confident errors",
                    "In use: the whole prediction pipeline, scope checks included"):
        assert section in page
    use = metrics["in_use"]
    assert use["films"] == metrics["n"] == 36 and f"<tr><td>{use['films']}</td>" in page
    answered = use["answered_by_class"]
    assert f"{use['answered_pneumonia_called_pneumonia']}/{answered['PNEUMONIA']} = " in page
    assert f"; {metrics['patients']} patients)" in page
    assert "bacterial" in page and "viral" in page
    assert not re.search(r"""(src|href)=["']https?://""", page), "the report must not load anything from the network"
    assert page.count("data:image/png;base64,") >= 2
    assert f"{metrics['metrics']['auroc']['value']:.3f}" in page


@pytest.mark.slow
@pytest.mark.skipif(find_chromium() is None, reason="chromium not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    png = screenshot(report[0], tmp_path / "report.png", height=2400)
    img = np.asarray(Image.open(png).convert("L"))
    assert img.shape == (2400, 1280)
    assert img.std() > 20, "the rendered page looks blank"


def test_the_model_s_threshold_row_is_counted_at_its_exact_threshold(tmp_path):
    from pneumoscan.metrics import metrics_with_ci
    from pneumoscan.report import build_report

    thr = 0.389753
    y = np.array([1] * 20 + [0] * 20)
    p = np.concatenate([np.full(19, 0.9), [0.38979], np.full(20, 0.1)])  # one pneumonia just above thr
    rep = {**metrics_with_ci(y, p, thr, n_boot=50), "ece_15": 0.0, "model_version": "t", "data_dir": "d",
           "calibrated": True}
    out = tmp_path / "r.html"
    build_report(rep, y, p, [f"f{i}.jpeg" for i in range(40)], out)
    row = re.search(r'<tr class="op"><td>([\d.]+) \(model\)</td><td>([\d.]+)</td>', out.read_text())
    assert row and float(row.group(1)) == pytest.approx(thr, abs=1e-4)
    assert float(row.group(2)) == 1.0  # at 0.3898, rounded, that film would fall below and sensitivity read 0.95


@pytest.fixture
def latin1_films(tmp_path, train_dir) -> Path:
    """A labelled folder named ``d\\xe9p\\xf4t`` with a real film named ``caf\\xe9.jpeg``: names not UTF-8."""
    root = not_utf8(tmp_path, b"d\xe9p\xf4t")
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir(parents=True)
        for f in sorted((train_dir / cls).glob("*.jpeg"))[:3]:
            (root / cls / f.name).symlink_to(f)
    not_utf8(root / "NORMAL", b"caf\xe9.jpeg").symlink_to(sorted((train_dir / "NORMAL").glob("*.jpeg"))[3])
    return root


def test_a_report_on_films_with_names_that_are_not_utf8_is_written(latin1_films, tmp_path, capsys):
    out = tmp_path / "R.html"
    out.write_text("yesterday's report")
    assert evaluate_main(["--data_dir", str(latin1_films), "--report", str(out), "--model_only",
                          "--n_boot", "20"]) == 0
    assert "d\\xe9p\\xf4t" in out.read_text(encoding="utf-8")  # the folder's name, its odd bytes as \xNN


def test_a_report_that_cannot_be_written_leaves_the_older_one_and_the_json(latin1_films, tmp_path, monkeypatch,
                                                                          capsys):
    import pneumoscan.report

    # names as they were before they were made printable: the write fails half-way, with UnicodeEncodeError
    monkeypatch.setattr(pneumoscan.report, "printable", lambda text: text, raising=False)
    out = tmp_path / "R.html"
    out.write_text("yesterday's report")
    assert evaluate_main(["--data_dir", str(latin1_films), "--report", str(out), "--output_path",
                          str(tmp_path / "m.json"), "--model_only", "--n_boot", "20"]) == 2
    assert out.read_text() == "yesterday's report" and not list(tmp_path.glob(".R.tmp*"))
    assert json.loads((tmp_path / "m.json").read_text())["n"] == 7
    assert f"cannot write {out}" in capsys.readouterr().err
