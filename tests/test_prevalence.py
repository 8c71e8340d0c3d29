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
    # the interval: each resample's own sensitivity and specificity, resampled as bootstrap_ci does (seed 0)
    rng, replicates = np.random.default_rng(0), []
    for _ in range(200):
        idx = rng.integers(0, len(y), len(y))
        sens, false_positive_rate = (np.mean(prob[idx][y[idx] == c] >= 0.5) for c in (1, 0))
        replicates.append(predictive_values(sens, 1 - false_positive_rate, 0.1))
    low, high = np.quantile(np.array(replicates), [0.025, 0.975], axis=0)
    assert (m["ppv_at_prevalence"]["ci_low"], m["ppv_at_prevalence"]["ci_high"]) == pytest.approx((low[0], high[0]))
    assert (m["npv_at_prevalence"]["ci_low"], m["npv_at_prevalence"]["ci_high"]) == pytest.approx((low[1], high[1]))
    assert report["prevalence"] == 0.1
    table = format_metrics_table(report)
    assert "ppv at 10%" in table and "npv at 10%" in table
    assert "ppv at 0.5%" in format_metrics_table(metrics_with_ci(y, prob, 0.5, n_boot=10, prevalence=0.005))
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
    err = capsys.readouterr().err
    assert "--prevalence" in err and "strictly between 0 and 1" in err


@pytest.mark.parametrize("value", ["0", "-5"])
def test_too_few_bootstrap_resamples_are_refused(small_labelled, value, capsys):
    assert evaluate_main(["--data_dir", str(small_labelled), "--n_boot", value]) == 2
    assert "at least 1 bootstrap resample" in capsys.readouterr().err


def test_a_ppv_without_a_single_false_positive_says_its_interval_has_no_width(tmp_path, train_dir, capsys):
    # three normal training films the shipped model clears: no false positive, so specificity is 1 in every
    # resample and the PPV's interval has no width; the warning gives the rule-of-three bound
    root = tmp_path / "films"
    for cls, n in (("NORMAL", 3), ("PNEUMONIA", 6)):
        (root / cls).mkdir(parents=True)
        for f in sorted((train_dir / cls).glob("*.jpeg"))[:n]:
            (root / cls / f.name).symlink_to(f)
    out = tmp_path / "m.json"
    assert evaluate_main(["--data_dir", str(root), "--prevalence", "0.2", "--n_boot", "50", "--model_only",
                          "--output_path", str(out)]) == 0
    report = json.loads(out.read_text())
    err = capsys.readouterr().err
    assert report["confusion"]["fp"] == 0 and report["metrics"]["ppv_at_prevalence"]["ci_low"] == 1.0
    assert "no false positive among these 3 normal films" in err and "rule of three is 0.000" in err  # 1 - 3/3
    assert "the PPV at 20% would be" in err
    # and the bound travels with the numbers, in the JSON (the HTML report reads it there)
    bound = report["zero_count_bounds"]["specificity"]
    sens = report["metrics"]["sensitivity"]["value"]
    assert (bound["films"], bound["lower_bound_95"]) == (3, 0.0)  # specificity 0 at the bound: PPV = prevalence * ...
    assert bound["ppv_at_prevalence_at_bound"] == pytest.approx(0.2 * sens / (0.2 * sens + 0.8))
    assert report["stored_threshold"] == report["threshold"] and report["threshold_given"] is False


def test_prevalence_is_ignored_with_a_warning_in_a_scope_report(tmp_path, train_dir, capsys):
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    (folder / "a.jpeg").symlink_to(sorted((train_dir / "NORMAL").glob("*.jpeg"))[0])
    assert evaluate_main(["--data_dir", str(folder), "--prevalence", "0.2", "--backend", "torch"]) == 0
    assert "ignored in this scope report" in capsys.readouterr().err
