"""The evaluation report: a self-contained HTML file, rendered by a real headless Chromium."""

from __future__ import annotations

import html
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


def test_an_overridden_threshold_is_labelled_given_beside_the_model_s_own(tmp_path):
    """``pneumoscan evaluate --threshold 0.3``: the operating row is the user's, not the model's; the model's
    stored threshold gets its own row and is named in the header."""
    from pneumoscan.metrics import metrics_with_ci
    from pneumoscan.report import build_report

    y = np.array([1] * 20 + [0] * 20)
    p = np.concatenate([np.linspace(0.35, 0.95, 20), np.linspace(0.05, 0.6, 20)])
    rep = {**metrics_with_ci(y, p, 0.3, n_boot=50), "ece_15": 0.0, "model_version": "t", "data_dir": "d",
           "calibrated": True, "threshold_given": True, "stored_threshold": 0.537667}
    out = tmp_path / "r.html"
    build_report(rep, y, p, [f"f{i}.jpeg" for i in range(40)], out)
    page = out.read_text()
    assert re.search(r'<tr class="op"><td>0\.3000 \(given\)</td>', page)
    stored = re.search(r"<tr><td>0\.5377 \(model\)</td><td>([\d.]+)</td><td>([\d.]+)</td>", page)
    assert stored and float(stored.group(2)) == pytest.approx(float((p[y == 0] < 0.537667).mean()), abs=1e-3)
    assert "(given with --threshold; the model's own is 0.5377)" in page
    assert page.count("(model)") == 1  # the 0.3 row is not called the model's
    rep.pop("threshold_given")  # the model's own threshold: as before
    build_report(rep, y, p, [f"f{i}.jpeg" for i in range(40)], out)
    page = out.read_text()
    assert '<tr class="op"><td>0.3000 (model)</td>' in page and "(given" not in page and "0.5377" not in page


@pytest.fixture
def films_with_left_out(tmp_path, train_dir, make_bad_files) -> Path:
    """Real films, plus files the loader leaves out: three unreadable ones (one named with HTML and a
    control character, one with a name that is not UTF-8) and a byte-identical copy of a film."""
    root = tmp_path / "films"
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir(parents=True)
        for f in sorted((train_dir / cls).glob("*.jpeg"))[:4]:
            (root / cls / f.name).symlink_to(f)
    bad = make_bad_files(root / "NORMAL")
    bad["text"].rename(root / "NORMAL" / "<i>x&\x1b.jpg")
    bad["empty"].rename(not_utf8(root / "PNEUMONIA", b"vide\xe9.jpg"))
    first = sorted((train_dir / "NORMAL").glob("*.jpeg"))[0]
    (root / "NORMAL" / "copy.jpeg").write_bytes(first.read_bytes())
    return root


def test_the_files_left_out_of_the_numbers_are_listed_in_the_report(films_with_left_out, tmp_path, capsys):
    out, js = tmp_path / "R.html", tmp_path / "m.json"
    assert evaluate_main(["--data_dir", str(films_with_left_out), "--report", str(out), "--output_path", str(js),
                          "--model_only", "--n_boot", "20", "--cache_dir", "none"]) == 1  # some left out
    skipped = json.loads(js.read_text())["skipped_files"]
    assert len(skipped) == 4
    page = out.read_text(encoding="utf-8")
    assert '<h2 id="left-out">Left out of the numbers (4 file(s))</h2>' in page
    assert "4 file(s) were left out of every number in this report" in page and 'href="#left-out"' in page
    assert "<tr><td>unreadable</td><td>3</td></tr>" in page and "<tr><td>duplicate</td><td>1</td></tr>" in page
    assert "&lt;i&gt;x&amp;\\x1b.jpg" in page and "<i>x" not in page and "\x1b" not in page
    assert "vide\\xe9.jpg" in page and "truncated.jpeg" in page and "copy.jpeg" in page
    assert all(html.escape(f["reason"]) in page for f in skipped)  # each reason, as the JSON gives it


def test_a_report_without_files_left_out_has_no_such_section(report):
    page = report[0].read_text()
    assert report[1]["skipped_files"] == [] and "Left out of the numbers" not in page and "left-out" not in page


def test_evaluate_with_a_given_threshold_labels_it_given_and_shows_the_model_s_own(train_dir, tmp_path):
    root = tmp_path / "films"
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir(parents=True)
        for f in sorted((train_dir / cls).glob("*.jpeg"))[:4]:
            (root / cls / f.name).symlink_to(f)
    out, js = tmp_path / "R.html", tmp_path / "m.json"
    assert evaluate_main(["--data_dir", str(root), "--threshold", "0.3", "--report", str(out), "--output_path",
                          str(js), "--model_only", "--n_boot", "20", "--cache_dir", "none"]) == 0
    stored = json.loads(js.read_text())["stored_threshold"]
    page = out.read_text()
    assert '<tr class="op"><td>0.3000 (given)</td>' in page and f"<tr><td>{stored:.4f} (model)</td>" in page


def test_a_bootstrap_interval_of_no_width_shows_the_json_s_rule_of_three_bound(train_dir, tmp_path):
    """A specificity (sensitivity) of 1 with no false positive (negative) gets [1, 1] from the bootstrap, which
    reads as certainty: the report gives the rule-of-three bound that the JSON's zero_count_bounds and the
    command's warning give, and the PPV (NPV) at the prevalence there."""
    root = tmp_path / "films"
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir(parents=True)
        for f in sorted((train_dir / cls).glob("*.jpeg"))[:4]:
            (root / cls / f.name).symlink_to(f)
    out, js = tmp_path / "R.html", tmp_path / "m.json"
    assert evaluate_main(["--data_dir", str(root), "--report", str(out), "--output_path", str(js), "--prevalence",
                          "0.2", "--model_only", "--n_boot", "20", "--cache_dir", "none"]) == 0
    bounds = json.loads(js.read_text())["zero_count_bounds"]
    assert bounds, "these 8 films are all called right by the shipped model"
    page = out.read_text()
    for metric, b in bounds.items():
        row = re.search(rf"<tr><td>{metric}</td><td>[\d.]+</td><td>\[1\.0+, 1\.0+\]; rule of three: &ge; ([\d.]+)</td>",
                        page)
        assert row and float(row.group(1)) == pytest.approx(b["lower_bound_95"], abs=5e-4), metric
        value = "ppv" if metric == "specificity" else "npv"
        at = re.search(rf"<tr><td>{value} at 20%</td>.*?; ([\d.]+) at the {metric}'s rule-of-three bound</td>", page)
        assert at and float(at.group(1)) == pytest.approx(b[f"{value}_at_prevalence_at_bound"], abs=5e-4), value
        films = "NORMAL" if metric == "specificity" else "PNEUMONIA"
        assert f"among these {b['films']} {films} films: the {metric} of 1 has a bootstrap interval of no width" in page


def test_numbers_are_not_rounded_onto_the_other_side_of_a_target_or_the_threshold(tmp_path):
    """The metrics table as the command prints them (4 decimals): 189/199 = 0.9497 must not read 0.950 beside a
    0.95 target. A false negative just under the threshold must not read as at or above it in the gallery."""
    from pneumoscan.metrics import metrics_with_ci
    from pneumoscan.report import build_report

    thr = 0.537667
    y = np.array([1] * 199 + [0] * 40)
    p = np.concatenate([np.full(189, 0.9), [0.53766, 0.53702], np.full(8, 0.2), np.full(40, 0.1)])
    rep = {**metrics_with_ci(y, p, thr, n_boot=20), "ece_15": 0.0, "model_version": "t", "data_dir": "d",
           "calibrated": True}
    out = tmp_path / "r.html"
    build_report(rep, y, p, [f"f{i}.jpeg" for i in range(len(y))], out, gallery_size=10)
    page = out.read_text()
    sens = re.search(r"<tr><td>sensitivity</td><td>([\d.]+)</td>", page)
    assert sens and float(sens.group(1)) < 0.95 and float(sens.group(1)) == pytest.approx(189 / 199, abs=5e-5)
    shown_thr = float(re.search(r"operating threshold ([\d.]+)", page).group(1))
    captions = dict(re.findall(r"<figcaption>(f\d+)\.jpeg<br>P\(PNEUMONIA\) = ([\d.]+)", page))
    assert set(captions) == {f"f{i}" for i in range(189, 199)}  # the 10 false negatives
    assert float(captions["f190"]) == pytest.approx(0.53702, abs=5e-5) and float(captions["f190"]) < shown_thr
    assert "<figcaption>f189.jpeg<br>P(PNEUMONIA) = 0.53766 (threshold 0.53767)" in page


def test_gallery_names_from_the_data_are_escaped_and_each_heatmap_says_what_it_shows(train_dir, tmp_path):
    """Real films under names a data set can hold (markup, a quote that would end an attribute, an escape code):
    shown as text, never as markup; each overlay's alt text names its film and the class its heat explains, and
    each gallery says how many of its errors it shows."""
    from html.parser import HTMLParser

    from pneumoscan.inference import MedicalImageInference
    from pneumoscan.metrics import metrics_with_ci
    from pneumoscan.report import build_report

    names = ["<script>alert(1).jpeg", "<img src=x onerror=alert(1)>.jpeg", 'x" onerror="alert(2)\x1b.jpeg',
             "plain.jpeg", "p1.jpeg", "p2.jpeg"]
    films = sorted((train_dir / "NORMAL").glob("*.jpeg"))[:4] + sorted((train_dir / "PNEUMONIA").glob("*.jpeg"))[:2]
    for name, film in zip(names, films):
        (tmp_path / name).symlink_to(film)
    y = np.array([0, 0, 0, 0, 1, 1])
    p = np.array([0.97, 0.96, 0.95, 0.2, 0.9, 0.1])  # the odd names are the false positives; p2 the false negative
    rep = {**metrics_with_ci(y, p, 0.5, n_boot=20), "ece_15": 0.0, "model_version": "t", "data_dir": str(tmp_path),
           "calibrated": True}
    engine = MedicalImageInference(gate=False, backend="torch")
    out = tmp_path / "r.html"
    build_report(rep, y, p, [str(tmp_path / n) for n in names], out, heatmap=engine.heatmap_data_uri, gallery_size=2)
    page = out.read_text()

    class Tags(HTMLParser):
        def __init__(self):
            super().__init__()
            self.imgs, self.scripts = [], 0

        def handle_starttag(self, tag, attrs):
            self.scripts += tag == "script"
            if tag == "img":
                self.imgs.append(dict(attrs))

    tags = Tags()
    tags.feed(page)
    assert tags.scripts == 0 and "\x1b" not in page
    assert all(set(a) == {"src", "alt"} for a in tags.imgs), "a file name added an attribute"
    alts = [a["alt"] for a in tags.imgs if a["src"].startswith("data:image/png;base64,")][2:]  # after the figures
    assert alts == [f"Grad-CAM heatmap of the evidence for PNEUMONIA on {n}" for n in
                    ("<script>alert(1).jpeg", "<img src=x onerror=alert(1)>.jpeg", "p2.jpeg")]
    assert "&lt;script&gt;alert(1).jpeg<br>" in page and "&lt;img src=x onerror=alert(1)&gt;.jpeg<br>" in page
    assert "NORMAL films called PNEUMONIA (2 of 3 shown)" in page and "called NORMAL (1 of 1 shown)" in page
    build_report(rep, y, p, [str(tmp_path / n) for n in names], out, heatmap=engine.heatmap_data_uri)
    tags = Tags()
    tags.feed(out.read_text())
    assert 'Grad-CAM heatmap of the evidence for PNEUMONIA on x" onerror="alert(2)\\x1b.jpeg' in (
        a["alt"] for a in tags.imgs)
    assert all(set(a) == {"src", "alt"} for a in tags.imgs)


def test_a_report_on_films_of_one_class_says_what_is_not_defined_and_draws_no_curves(train_dir, tmp_path):
    """Every PNEUMONIA file unreadable, so only NORMAL films are counted: the AUROC and the sensitivity do not
    exist (not 0, not 'nan'), and no ROC curve is drawn from zero counts (a flat line at sensitivity 0 beside a
    model that called every normal film right)."""
    root = tmp_path / "films"
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir(parents=True)
    for f in sorted((train_dir / "NORMAL").glob("*.jpeg"))[:6]:
        (root / "NORMAL" / f.name).symlink_to(f)
    (root / "PNEUMONIA" / "bad.jpg").write_text("not an image")
    out, js = tmp_path / "R.html", tmp_path / "m.json"
    assert evaluate_main(["--data_dir", str(root), "--report", str(out), "--output_path", str(js), "--model_only",
                          "--n_boot", "20", "--cache_dir", "none"]) == 1  # one file left out
    assert json.loads(js.read_text())["n_positive"] == 0
    page = out.read_text()
    assert "<tr><td>auroc</td><td>not defined</td><td>not defined</td></tr>" in page
    assert "<tr><td>sensitivity</td><td>not defined</td><td>not defined</td></tr>" in page
    assert "Not defined on these films: sensitivity, ppv, f1, auroc (there is no PNEUMONIA film)" in page
    assert not re.search(r"\bnan\b", re.sub(r"data:image/png;base64,[\w+/=]+", "", page), re.IGNORECASE)
    assert "Not drawn: these films hold no PNEUMONIA film" in page
    assert page.count("data:image/png;base64,") == 1  # the reliability diagram only
