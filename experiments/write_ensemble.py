#!/usr/bin/env python
"""Write trained models as one calibrated ensemble checkpoint (``ensemble.write_ensemble``).

The members are k-fold runs with the usual validation patients held out, or plain runs on the usual split
(fine-tunes of one model, other training recipes; the split's seed must be the same, since it picks the
validation patients): the ensemble's temperature, threshold and gate are fitted on that
validation split, as ``pneumoscan train`` does for one model. Weights are stored in float16 unless --fp32.

    python experiments/write_ensemble.py --data_dir ../shared/data/chest_xray \\
        --members src/pneumoscan/weights/pneumoscan-v2.pth /work/runs/asp_member/medical_cnn_model.pth \\
        --out /work/runs/ens_asp.pth
"""

from __future__ import annotations

import argparse
import logging

from pneumoscan.checkpoint import load_checkpoint
from pneumoscan.cli import configure_logging
from pneumoscan.ensemble import write_ensemble

log = logging.getLogger("pneumoscan.experiments.write_ensemble")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--members", nargs="+", required=True, help="member checkpoints")
    p.add_argument("--data_dir", required=True, help="the folder the members were trained on")
    p.add_argument("--out", required=True)
    p.add_argument("--cache_dir", default="")
    p.add_argument("--fp32", action="store_true", help="store float32 weights (default float16)")
    args = p.parse_args(argv)
    configure_logging()
    final = write_ensemble([load_checkpoint(m) for m in args.members], args.out, data_dir=args.data_dir,
                           cache_dir=args.cache_dir, half=not args.fp32)
    log.info("validation at the stored threshold: %s",
             {k: round(float(v), 4) for k, v in final["metrics_summary"].items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
