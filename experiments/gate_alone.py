#!/usr/bin/env python
"""The feature-distance stage alone: share of inputs above each checkpoint's distance limit.

For checkpoints with the same network weights and different gates (the shipped model and a site
checkpoint written by ``pneumoscan calibrate --refit_gate``), the share of dev_shift's films (by
folder) and of the generated non-radiographs (``experiments/ood_corpus.py``) whose feature distance
is above each gate's limit, whatever the scope classifier and the pixel checks would say. It measures
how much of the second line of defence a raised limit gives up (docs/experiments.md, "Loosening the
feature-distance gate for a site").

    cd experiments && PYTHONPATH=. python gate_alone.py --model_path A.pth --model_path B.pth \\
        --dev_shift ../../shared/data/dev_shift --ood_dir /tmp/ood --json gate_alone.json
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from gate_acquisition import share
from scope_data import dev_shift_table, ood_table, reference_scores, reference_sets, store_gate_entries

from pneumoscan.checkpoint import load_checkpoint
from pneumoscan.cli import configure_logging
from pneumoscan.gate import OutOfScopeGate
from pneumoscan.predict import Predictor
from pneumoscan.results import command_line, write_json
from pneumoscan.scope import model_digest

log = logging.getLogger("pneumoscan.gate_alone")
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", action="append", required=True,
                   help="a checkpoint (give two or more with the same weights)")
    p.add_argument("--dev_shift", default=str(SHARED / "dev_shift"))
    p.add_argument("--ood_dir", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--store", action="store_true",
                   help="also store these scores under the first checkpoint's gate in that checkpoint (what "
                        "pneumoscan calibrate --refit_gate reports a raised limit giving up); nothing else changes")
    args = p.parse_args(argv)
    configure_logging()

    ckpts = [load_checkpoint(m) for m in args.model_path]
    first = model_digest(ckpts[0]["model_state"])
    for path, c in zip(args.model_path[1:], ckpts[1:]):
        if model_digest(c["model_state"]) != first:
            p.error(f"{path} has other network weights than {args.model_path[0]}: its features differ, compare "
                    "gates of one model only")
    predictor = Predictor.from_checkpoint(ckpts[0], "cpu")
    gates = [OutOfScopeGate.from_dict(c["ood_gate"]) for c in ckpts]

    sets = reference_sets(dev_shift_table(predictor, Path(args.dev_shift)), ood_table(predictor, Path(args.ood_dir)))
    if args.store:
        store_gate_entries(ckpts[0], args.model_path[0], reference=reference_scores(gates[0], sets))

    report: dict = {"checkpoints": [{"model_path": m, "model_version": c.get("model_version"), "limit": g.threshold}
                                    for m, c, g in zip(args.model_path, ckpts, gates)], "sets": {}}
    for name, feats in sets.items():
        report["sets"][name] = [share(g.scores(feats), g.threshold) for g in gates]
        log.info("%-34s n %4d  %s", name, report["sets"][name][0]["n"],
                 "  ".join(f"{100 * r['rate']:5.1f} %" for r in report["sets"][name]))
    report["command"] = command_line("experiments/gate_alone.py", argv)
    write_json(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
