#!/usr/bin/env python
"""The markdown table of docs/experiments.md (issue 7) from experiments/kfold_eval.py reports.

    python experiments/cv_table.py docs/cv/fast_light.json docs/cv/fast_acq.json ... > table.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def ci(m: dict, digits: int = 4) -> str:
    return f"{m['value']:.{digits}f} [{m['ci_low']:.{digits}f}, {m['ci_high']:.{digits}f}]"


def row(path: Path) -> str:
    r = json.loads(path.read_text())
    o, cvd = r["oof"], r["oof"]["cross_validated"]
    stress = r.get("stress_auroc_fold_mean") or r["stress_auroc"]
    adult = r.get("adult_dev_shift") or {}
    held = r.get("ensemble_holdout")
    if held:
        hm = held["validation"]["at_threshold"]["metrics"]
        held_txt = (f"{ci(hm['auroc'])}; sens/spec {hm['sensitivity']['value']:.3f}/{hm['specificity']['value']:.3f}"
                    f"; ECE {held['ece_after_cross_fitted']:.3f}; stress "
                    + "/".join(f"{v:.4f}" for v in held["stress_auroc"].values()))
    else:
        held_txt = "(the model itself: see left)"
    return (f"| {path.stem} | {r['members']} | {o['n']} | {ci(o['auroc'])} | {o['fold_auroc_mean']:.4f} ± "
            f"{o['fold_auroc_sd']:.4f} | {o['at_oof_threshold']['specificity']['value']:.3f} | "
            f"{cvd['sensitivity']:.3f} / {cvd['specificity']:.3f} / {cvd['accuracy']:.3f} | {cvd['ece']:.3f} | "
            f"{'/'.join(f'{v:.4f}' for v in stress.values())} | "
            f"{adult.get('auroc_ensemble', float('nan')):.3f} | {held_txt} |")


def main(argv: list[str]) -> int:
    lines = ["| candidate | models | OOF films | OOF AUROC [95% CI] | per-fold AUROC | spec @ OOF thr (sens 0.95) "
             "| cross-validated sens / spec / acc | cross-validated ECE "
             "| stress AUROC per model hist-eq / JPEG q10 / 25 % res | adult dev_shift AUROC "
             "| ensemble on the 780 held-out films: AUROC; sens/spec; ECE; stress |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    sys.stdout.write("\n".join(lines + [row(Path(p)) for p in argv]) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
