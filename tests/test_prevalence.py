"""PPV and NPV where pneumonia is as common as a clinic says (``evaluate --prevalence``): the arithmetic,
the table and report labels, the CLI on real films, and the bad values it refuses."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pneumoscan.cli import evaluate_main
from pneumoscan.metrics import check_prevalence, format_metrics_table, metrics_with_ci, predictive_values


def test_ppv_and_npv_at_a_prevalence_by_hand():
    ppv, npv = predictive_values(0.95, 0.90, 0.2)
    # of 1,000 films: 200 with pneumonia (190 found), 800 without (80 false alarms, 720 cleared, 10 missed)
    assert ppv == pytest.approx(190 / 270) and npv == pytest.approx(720 / 730)
    assert predictive_values(1.0, 1.0, 0.3) == (1.0, 1.0)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, math.nan])
def test_a_prevalence_outside_0_1_is_refused_with_an_example(bad):
    with pytest.raises(ValueError, match=r"strictly between 0 and 1 \(e.g. 0.2"):
        check_prevalence(bad)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        predictive_values(0.9, 0.9, bad)


def test_metrics_at_a_prevalence_come_from_the_same_bootstrap():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    prob = np.clip(0.35 * y + rng.uniform(0, 0.65, 400), 0, 1)
    report = metrics_with_ci(y, prob, 0.5, n_boot=200, prevalence=0.1)
    m = report["metrics"]
    want = predictive_values(m["sensitivity"]["value"], m["specificity"]["value"], 0.1)
    assert (m["ppv_at_prevalence"]["value"], m["npv_at_prevalence"]["value"]) == pytest.approx(want)
    assert m["ppv_at_prevalence"]["value"] < m["ppv"]["value"]  # these films are half pneumonia, the clinic 10 %
    for name in ("ppv_at_prevalence", "npv_at_prevalence"):
        assert m[name]["ci_low"] < m[name]["value"] < m[name]["ci_high"]
    assert report["prevalence"] == 0.1
    table = format_metrics_table(report)
    assert "ppv at 10%" in table and "npv at 10%" in table
    plain = metrics_with_ci(y, prob, 0.5, n_boot=200)
    assert "ppv_at_prevalence" not in plain["metrics"] and "prevalence" not in plain
    # the other metrics and their intervals do not change when a prevalence is asked for
    assert all(plain["metrics"][k] == m[k] for k in plain["metrics"])


@pytest.fixture(scope="module")
def small_labelled(tmp_path_factory, train_dir):
    root = tmp_path_factory.mktemp("labelled")
    for cls, n in (("NORMAL", 12), ("PNEUMONIA", 12)):
        (root / cls).mkdir()
        for f in sorted((train_dir / cls).glob("*.jpeg"))[:n]:
            (root / cls / f.name).symlink_to(f)
    return root


def test_evaluate_gives_ppv_and_npv_at_the_stated_prevalence(small_labelled, tmp_path, capsys):
    out, page = tmp_path / "m.json", tmp_path / "r.html"
    assert evaluate_main(["--data_dir", str(small_labelled), "--prevalence", "0.2", "--n_boot", "50",
                          "--model_only", "--output_path", str(out), "--report", str(page)]) == 0
    stdout = capsys.readouterr().out
    assert "ppv at 20%" in stdout and "npv at 20%" in stdout
    report = json.loads(out.read_text())
    m = report["metrics"]
    assert report["prevalence"] == 0.2
    assert m["ppv_at_prevalence"]["value"] == pytest.approx(
        predictive_values(m["sensitivity"]["value"], m["specificity"]["value"], 0.2)[0])
    assert "ppv at 20%" in page.read_text()


@pytest.mark.parametrize("value", ["0", "1.2", "nan"])
def test_a_bad_prevalence_flag_says_what_to_give(small_labelled, value, capsys):
    assert evaluate_main(["--data_dir", str(small_labelled), "--prevalence", value]) == 2
    assert "--prevalence" in capsys.readouterr().err
