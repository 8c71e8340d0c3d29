"""The evaluation report: one self-contained HTML file (figures inlined, no network).

Sections: metrics with CIs, ROC and PR curves, confusion matrix at the operating point,
reliability diagram with ECE, a threshold table, sensitivity by pneumonia type (from file
names), the files left out of the numbers (when there are any), and a gallery of the most
confident false positives and false negatives.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import numpy as np

from .atomic import write_text
from .data import left_out_kind
from .metrics import binary_metrics, confusion, metric_label, reliability_bins, wilson_interval
from .names import printable
from .plots import new_figure

THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def roc_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct score, from (0, 0) to (1, 1)."""
    order = np.argsort(-p, kind="mergesort")
    ys, ps = y[order].astype(bool), p[order]
    last = np.r_[np.flatnonzero(np.diff(ps)), len(ps) - 1]
    tp, fp = np.cumsum(ys)[last], np.cumsum(~ys)[last]
    return np.r_[0, fp / max(fp[-1], 1)], np.r_[0, tp / max(tp[-1], 1)]


def pr_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) at every distinct score."""
    order = np.argsort(-p, kind="mergesort")
    ys, ps = y[order].astype(bool), p[order]
    last = np.r_[np.flatnonzero(np.diff(ps)), len(ps) - 1]
    tp, fp = np.cumsum(ys)[last], np.cumsum(~ys)[last]
    return tp / max(ys.sum(), 1), tp / np.maximum(tp + fp, 1)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _curves(y: np.ndarray, p: np.ndarray, threshold: float, auroc: float) -> str:
    fig, (a, b) = new_figure((10, 4.3), 2)
    fpr, tpr = roc_points(y, p)
    m = binary_metrics(y, p, threshold)
    a.plot(fpr, tpr, lw=2, label=f"AUROC {auroc:.4f}")
    a.plot([0, 1], [0, 1], "k--", lw=1)
    a.plot(1 - m["specificity"], m["sensitivity"], "ro", label=f"operating point (t = {threshold:.4f})")
    a.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC curve")
    a.legend(loc="lower right")
    rec, prec = pr_points(y, p)
    b.plot(rec, prec, lw=2, label=f"prevalence {y.mean():.2f}")
    b.plot(m["sensitivity"], m["ppv"], "ro", label="operating point")
    b.set(xlabel="sensitivity (recall)", ylabel="PPV (precision)", title="Precision-recall curve", ylim=(0, 1.02))
    b.legend(loc="lower left")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _reliability(y: np.ndarray, p: np.ndarray, ece: float) -> str:
    bins = [b for b in reliability_bins(y, p) if b["count"]]
    fig, ax = new_figure((5, 4.3))
    ax.plot([0.5, 1], [0.5, 1], "k--", lw=1, label="perfect calibration")
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", label=f"model (ECE {ece:.3f})")
    ax.set(xlabel="confidence of predicted class", ylabel="observed accuracy", title="Reliability diagram",
           xlim=(0.5, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _fmt(v: float) -> str:
    """A metric as the command's table prints it (4 decimals): at 3, a sensitivity of 189/199 = 0.9497 read
    0.950, meeting a 0.95 target it misses."""
    return "not defined" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _ci(m: dict) -> str:
    """A metric's CI cell: [low, high], or "not defined" once where neither bound is."""
    low, high = _fmt(m["ci_low"]), _fmt(m["ci_high"])
    return "not defined" if low == high == "not defined" else f"[{low}, {high}]"


def _p_beside(p: float, threshold: float) -> str:
    """P(PNEUMONIA) of a gallery film, with as many decimals (4 or more) as keep it on its side of the threshold
    as shown: rounded, a false negative just under it (0.53766 at 0.53767) read as the threshold or above;
    beyond 4 decimals the threshold is shown beside it at the same precision."""
    for digits in range(4, 10):
        if (float(f"{p:.{digits}f}") < float(f"{threshold:.{digits}f}")) == (p < threshold):
            break
    text = f"{p:.{digits}f}"
    return text if digits == 4 else f"{text} (threshold {threshold:.{digits}f})"


def _subtype(path: str) -> str:
    name = Path(path).name.lower()
    return "bacterial" if "bacteria" in name else "viral" if "virus" in name else ""


def _in_use_html(u: dict) -> str:
    """The 'in use' section: what the whole prediction pipeline did to these films (``scope_report.in_use_report``)."""
    def rate(k: int, n: int) -> str:
        return f"{k}/{n} = {k / n:.3f}" if n else "n/a"

    reasons = ", ".join(f"{html.escape(k)} {v}" for k, v in u["refused_by_reason"].items()) or "none"
    wrong, refused = u["wrong_with_low_risk_by_class"], u["refused_by_class"]
    return f"""<h2>In use: the whole prediction pipeline, scope checks included</h2>
<p>The metrics above score the model on every film. Run as a prediction, each film first passes the scope
checks; a refused film gets no answer, and a wrong answer with LOW risk is the error a reader is least
likely to question.</p>
<table><tr><th>films</th><th>refused (NORMAL / PNEUMONIA)</th><th>refused by reason</th><th>answered</th>
<th>answered with a lateral or population warning</th><th>answered with a low-detail warning</th>
<th>sensitivity / specificity on the answered</th>
<th>wrong with LOW risk (NORMAL called PNEUMONIA / PNEUMONIA called NORMAL)</th></tr>
<tr><td>{u['films']}{f" ({u['unreadable']} unreadable)" if u['unreadable'] else ""}</td>
<td>{u['refused']} ({refused['NORMAL']} / {refused['PNEUMONIA']})</td>
<td>{reasons}</td><td>{u['answered']}</td><td>{u['answered_with_lateral_or_population_warning']}</td>
<td>{u.get('answered_with_low_detail_warning', 'not counted')}</td>
<td>{rate(u['answered_pneumonia_called_pneumonia'], u['answered_by_class']['PNEUMONIA'])} /
{rate(u['answered_normal_called_normal'], u['answered_by_class']['NORMAL'])}</td>
<td>{u['wrong_with_low_risk']} ({wrong['NORMAL']} / {wrong['PNEUMONIA']})</td></tr></table>"""


# evaluate's zero_count_bounds: the metric of 1 a count of zero errors gives, the films it counts, the error
ZERO_COUNT = {"specificity": ("false positive", "NORMAL", "ppv"), "sensitivity": ("false negative", "PNEUMONIA", "npv")}


def _bound_note(name: str, bounds: dict) -> str:
    """What the CI cell of metric ``name`` adds when a zero count made its bootstrap interval of no width: the
    rule-of-three lower bound (a specificity or sensitivity of 1), or the PPV or NPV at that bound."""
    if name in bounds:
        return f"; rule of three: &ge; {_fmt(bounds[name]['lower_bound_95'])}"
    for metric, b in bounds.items():
        key = f"{name}_at_bound"
        if metric in ZERO_COUNT and name == f"{ZERO_COUNT[metric][2]}_at_prevalence" and key in b:
            return f"; {_fmt(b[key])} at the {metric}'s rule-of-three bound"
    return ""


def _bounds_html(bounds: dict) -> str:
    """A warning under the metrics table for each metric of 1 whose bootstrap interval has no width, which reads
    as certainty: the films it rests on and its rule-of-three 95 % lower bound (1 - 3/n), as in the JSON."""
    lines = "".join(
        f"<li>No {ZERO_COUNT[metric][0]} among these {b['films']} {ZERO_COUNT[metric][1]} films: the {metric} of 1 "
        f"has a bootstrap interval of no width; its 95 % lower bound by the {html.escape(b['rule'])} is "
        f"<b>{_fmt(b['lower_bound_95'])}</b>.</li>"
        for metric, b in bounds.items() if metric in ZERO_COUNT)
    return f'<div class="warn"><ul>{lines}</ul></div>' if lines else ""


def _shown(path: str) -> str:
    """A file path as the page shows it: undecodable bytes as ``\\xNN`` (``names.printable``), control
    characters escaped too (a newline or an escape code in a name must not break or restyle the row), then
    HTML-escaped."""
    text = "".join(ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode("ascii")
                   for ch in printable(str(path)))
    return html.escape(text)


def _left_out_html(skipped: list[dict]) -> str:
    """The 'left out' section: the files the loader left out of every number (evaluate's ``skipped_files``),
    counted by kind as the command's output counts them, then each with its path and reason."""
    counts = Counter(left_out_kind(f["reason"]) for f in skipped)
    kinds = "".join(f"<tr><td>{html.escape(k)}</td><td>{counts[k]}</td></tr>"
                    for k in sorted(counts, key=lambda k: (-counts[k], k)))
    rows = "".join(f"<tr><td>{_shown(f['path'])}</td><td>{_shown(f['reason'])}</td></tr>" for f in skipped)
    return f"""<h2 id="left-out">Left out of the numbers ({len(skipped)} file(s))</h2>
<p>These files are in none of the metrics, curves, tables or galleries of this report.</p>
<table><tr><th>reason</th><th>files</th></tr>{kinds}</table>
<table class="files"><tr><th>file</th><th>reason</th></tr>{rows}</table>"""


def build_report(report: dict, y: np.ndarray, prob: np.ndarray, paths: list[str], out_path: str | Path,
                 heatmap: Callable[[str], str | None] | None = None, gallery_size: int = 6) -> None:
    """Write the HTML report.

    Args:
        report: ``metrics_with_ci`` output plus ``ece_15``, ``model_version``, ``data_dir``, ``calibrated``;
            optionally ``skipped_files`` (``{"path", "reason"}`` of the files left out of the numbers) and, when
            the threshold was given rather than the model's, ``threshold_given`` (True) and ``stored_threshold``.
        y, prob: labels (1 = PNEUMONIA) and P(PNEUMONIA) per image, in ``paths`` order.
        heatmap: optional function from an image path to a PNG data URI of its Grad-CAM overlay for PNEUMONIA
            (the report says so), or None where there is none.
    """
    y = np.asarray(y).astype(int)
    p = np.asarray(prob, dtype=np.float64)
    thr = report["threshold"]
    esc = html.escape
    bounds = report.get("zero_count_bounds") or {}
    metrics_rows = "".join(
        f"<tr><td>{esc(metric_label(name, report))}</td><td>{_fmt(m['value'])}</td>"
        f"<td>{_ci(m)}{_bound_note(name, bounds)}</td></tr>"
        for name, m in report["metrics"].items())
    c = confusion(y, p, thr)
    # --threshold given: the operating point is the user's, and the model's own is shown beside it
    given = bool(report.get("threshold_given"))
    stored = report.get("stored_threshold") if given else None
    exact = {thr} | ({stored} if stored is not None else set())
    thr_rows = ""
    # the operating row at its exact threshold (a rounded one could put a film on the other side)
    for t in sorted({t for t in THRESHOLDS if min(abs(t - e) for e in exact) >= 1e-4} | exact):
        m = binary_metrics(y, p, t)
        mark = ' class="op"' if t == thr else ""
        label = (" (given)" if given else " (model)") if t == thr else " (model)" if t == stored else ""
        thr_rows += (f"<tr{mark}><td>{t:.4f}{label}</td><td>{_fmt(m['sensitivity'])}</td>"
                     f"<td>{_fmt(m['specificity'])}</td><td>{_fmt(m['ppv'])}</td><td>{_fmt(m['npv'])}</td></tr>")
    op_text = (f"operating threshold {thr:.4f} (given with --threshold"
               + (f"; the model's own is {stored:.4f}" if stored is not None else "") + ")"
               if given else f"operating threshold {thr:.4f}")
    sub_rows = ""
    for kind in ("bacterial", "viral"):
        idx = [i for i, path in enumerate(paths) if y[i] == 1 and _subtype(path) == kind]
        if idx:
            k = int((p[idx] >= thr).sum())
            lo, hi = wilson_interval(k, len(idx))
            sub_rows += (f"<tr><td>{kind}</td><td>{len(idx)}</td><td>{k / len(idx):.3f}</td>"
                         f"<td>[{lo:.3f}, {hi:.3f}]</td></tr>")
    subtype_html = (f"<table><tr><th>pneumonia type</th><th>n</th><th>sensitivity</th><th>95% CI (Wilson)</th></tr>"
                    f"{sub_rows}</table>" if sub_rows else
                    "<p>No file names mark bacterial or viral pneumonia in this data set.</p>")

    def gallery(title: str, idx: list[int], total: int) -> str:
        cards = ""
        for i in idx:
            name = _shown(Path(paths[i]).name)  # control characters too: the name is in an attribute and a caption
            src = heatmap(paths[i]) if heatmap else None
            img = (f'<img src="{src}" alt="Grad-CAM heatmap of the evidence for PNEUMONIA on {name}">' if src else
                   "<div class='noimg'>no heatmap</div>")
            note = f"<br><b>refused in use</b> ({_shown(refused[paths[i]])})" if paths[i] in refused else ""
            cards += (f"<figure>{img}<figcaption>{name}<br>"
                      f"P(PNEUMONIA) = {_p_beside(p[i], thr)}{note}</figcaption></figure>")
        return (f"<h3>{esc(title)} ({len(idx)} of {total} shown)</h3>"
                f"<div class='gallery'>{cards or '<p>none</p>'}</div>")

    in_use_html = _in_use_html(report["in_use"]) if report.get("in_use") else ""
    skipped = report.get("skipped_files") or []
    left_out_html = _left_out_html(skipped) if skipped else ""
    left_out_note = (f'<p class="warn">{len(skipped)} file(s) were left out of every number in this report: '
                     f'<a href="#left-out">listed below</a> with the reason.</p>' if skipped else "")
    refused = {r["path"]: r["reason"] for r in (report.get("in_use") or {}).get("refused_files", [])}
    fp_idx = [i for i in np.argsort(-p) if y[i] == 0 and p[i] >= thr][:gallery_size]
    fn_idx = [i for i in np.argsort(p) if y[i] == 1 and p[i] < thr][:gallery_size]
    # One class only (the other's films all left out, say): the curves would be drawn from zero counts (a flat
    # ROC at sensitivity 0 for a model that called every normal film right) and the AUROC does not exist.
    missing = [name for name, count in (("PNEUMONIA", int(y.sum())), ("NORMAL", int((y == 0).sum()))) if not count]
    undefined = [metric_label(name, report) for name, m in report["metrics"].items()
                 if _fmt(m["value"]) == "not defined"]
    why = f"there is no {' or '.join(missing)} film" if missing else "no film is in the count each one divides by"
    undefined_html = (f'<p class="warn">Not defined on these films: {esc(", ".join(undefined))} ({why}).</p>'
                      if undefined else "")
    auroc = report["metrics"]["auroc"]["value"]
    curves_html = (f'<p class="warn">Not drawn: these films hold no {" or ".join(missing)} film, and the ROC and '
                   f'precision-recall curves (and the AUROC) need films of both classes.</p>' if missing else
                   f'<img src="{_curves(y, p, thr, auroc)}" alt="ROC and precision-recall curves, AUROC '
                   f'{_fmt(auroc)}, with the operating point at threshold {thr:.4f}">')
    cal = ("uncalibrated" if not report.get("calibrated") else "calibrated (temperature and intercept, a site's)"
           if report.get("calibration_bias") else "calibrated (temperature scaling)")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>pneumoscan evaluation report</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:1100px;margin:24px auto;padding:0 16px;color:#222}}
h1{{font-size:1.6em}} h2{{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}}
table{{border-collapse:collapse;margin:8px 0}} td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
th{{background:#f0f0f0}} td:first-child{{text-align:left}} tr.op{{background:#fff3c4;font-weight:bold}}
.cm td{{width:120px;text-align:center}} .meta{{color:#555}}
.gallery{{display:flex;flex-wrap:wrap;gap:10px}} figure{{margin:0;width:170px;font-size:.8em;overflow-wrap:anywhere}}
figure img{{width:170px;height:170px;object-fit:contain;background:#000}}
.noimg{{width:170px;height:170px;background:#eee;display:flex;align-items:center;justify-content:center}}
.warn{{background:#fdecea;padding:8px;border-left:4px solid #c62828}}
table.files td{{text-align:left;overflow-wrap:anywhere;max-width:600px}}
</style></head><body>
<h1>pneumoscan evaluation report</h1>
<p class="meta">Model <b>{esc(str(report.get('model_version', '')))}</b>
on <b>{esc(str(report.get('data_dir', '')))}</b>
&middot; {report['n']} images ({report['n_positive']} PNEUMONIA, {report['n'] - report['n_positive']} NORMAL{
    f"; {report['patients']} patients" if 'patients' in report else ""})
&middot; probabilities {cal} &middot; {op_text} &middot; generated
{datetime.now().astimezone().isoformat(timespec='seconds')}</p>
{left_out_note}
<p class="warn">A screening aid for frontal pediatric chest radiographs, read by a clinician; not a diagnosis.</p>
<h2>Metrics at the operating threshold</h2>
<table><tr><th>metric</th><th>value</th><th>95% CI</th></tr>{metrics_rows}</table>
<p class="meta">CIs: {esc(report.get('ci_method', ''))}.</p>
{undefined_html}
{_bounds_html(bounds)}
<h2>ROC and precision-recall curves</h2>{curves_html}
<h2>Confusion matrix (threshold {thr:.4f})</h2>
<table class="cm"><tr><th scope="col">true class</th><th scope="col">predicted PNEUMONIA</th>
<th scope="col">predicted NORMAL</th></tr>
<tr><th scope="row">PNEUMONIA</th><td>TP {c['tp']}</td><td>FN {c['fn']}</td></tr>
<tr><th scope="row">NORMAL</th><td>FP {c['fp']}</td><td>TN {c['tn']}</td></tr></table>
<h2>Calibration</h2><img src="{_reliability(y, p, report['ece_15'])}" alt="reliability diagram">
<p>Expected calibration error (15 bins): <b>{report['ece_15']:.4f}</b>.</p>
<h2>Threshold table</h2>
<table><tr><th>threshold</th><th>sensitivity</th><th>specificity</th><th>PPV (these films)</th>
<th>NPV (these films)</th></tr>{thr_rows}</table>
<h2>Sensitivity by pneumonia type</h2>{subtype_html}
{in_use_html}
{left_out_html}
<h2>Most confident errors</h2>
{"<p>Each heatmap is the Grad-CAM of the evidence for PNEUMONIA (red: most), in both galleries.</p>" if heatmap else ""}
{gallery("False positives: NORMAL films called PNEUMONIA", fp_idx, c["fp"])}
{gallery("False negatives: PNEUMONIA films called NORMAL", fn_idx, c["fn"])}
</body></html>
"""
    write_text(out_path, printable(page))  # atomic: a report that fails half-way leaves the earlier one whole
