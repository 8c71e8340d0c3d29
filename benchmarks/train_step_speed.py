#!/usr/bin/env python
"""Training throughput of one MedicalCNN configuration under the torch this interpreter imports.

    python benchmarks/train_step_speed.py --width 1.0 --image_size 224
    /other/venv/bin/python benchmarks/train_step_speed.py ...   # the same under another torch build
    python benchmarks/train_step_speed.py --width 0.5 --image_size 128 --intensity equalize  # input equalised

Times bare training steps (the model input made from uint8 images by ``InputSpec.to_tensor``, with
``--intensity``; forward, plain cross-entropy, backward, Adam step; channels_last, float32, batch 32;
no augmentation or mixup, unlike ``pneumoscan.step.train_step``, so that the network's own cost is
what differs between builds, and the numbers recorded since issue 3 stay comparable) on random images
after two warm-up steps, over ``--rounds`` rounds, and prints the median and best images per
second with the torch version and thread count. Run two builds one after the other, alternating
(A B A B), and compare only within one such sitting: machines differ and are noisy.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import emit

from pneumoscan.config import TrainConfig
from pneumoscan.model import build_model
from pneumoscan.predict import InputSpec
from pneumoscan.preprocess import INTENSITIES


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--intensity", choices=INTENSITIES, default="raw")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    torch.manual_seed(0)
    model = build_model(TrainConfig(width=args.width, image_size=args.image_size)).to(
        memory_format=torch.channels_last).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    spec = InputSpec(args.image_size, 0.5, 0.25, 3, intensity=args.intensity)
    pixels = torch.randint(0, 256, (args.batch_size, args.image_size, args.image_size), dtype=torch.uint8)
    y = torch.randint(0, 2, (args.batch_size,))
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(spec.to_tensor(pixels)), y).backward()
        opt.step()

    for _ in range(2):
        step()
    rates = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        rates.append(args.steps * args.batch_size / (time.perf_counter() - t0))
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "width": args.width,
              "image_size": args.image_size, "batch_size": args.batch_size, "intensity": args.intensity,
              "img_per_s_median": statistics.median(rates), "img_per_s_best": max(rates), "rounds": rates}
    emit(result, f"torch {torch.__version__} ({torch.get_num_threads()} threads), width {args.width}, "
         f"{args.image_size} px, {args.intensity}: {statistics.median(rates):.2f} img/s median, "
         f"{max(rates):.2f} best", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
