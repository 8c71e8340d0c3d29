"""The evaluation report: a self-contained HTML file, rendered by a real headless Chromium."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
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
