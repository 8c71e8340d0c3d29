#!/usr/bin/env python
"""Generate a corpus of images that are NOT chest radiographs, to measure the out-of-scope gate.

Everything is made here or taken from files that installed packages ship (scikit-learn's
sample photos and digits, matplotlib's sample data: photos, a logo, an MR slice, elevation
maps); nothing is downloaded. Categories: photo (colour and grayscale crops), mr_slice,
elevation_map, ct_phantom (Shepp-Logan-like slices saved as PNG), document (rendered text),
screenshot (rendered charts), digits, noise, blank (uniform), pattern (gradients, stripes, checkers).

    python experiments/ood_corpus.py --out /tmp/ood   # writes CATEGORY/NAME.png|jpg
"""

from __future__ import annotations

import argparse
import gzip
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

WORDS = ("patient report discharge summary medication dose mg daily review follow clinic invoice total "
         "account number date signature history examination impression plan laboratory results normal").split()


def _crops(img: Image.Image, n: int, rng: np.random.Generator) -> list[Image.Image]:
    out = []
    for _ in range(n):
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.4, 0.9)), int(h * rng.uniform(0.4, 0.9))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        out.append(img.crop((x, y, x + cw, y + ch)))
    return out


def _phantom(rng: np.random.Generator, size: int = 512) -> np.ndarray:
    yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    img = np.zeros((size, size))
    ellipses = [(1.0, 0.69, 0.92, 0, 0, 0), (-0.8, 0.66, 0.87, 0, -0.02, 0), (-0.2, 0.11, 0.31, 0.22, 0, -18),
                (-0.2, 0.16, 0.41, -0.22, 0, 18), (0.1, 0.21, 0.25, 0, 0.35, 0), (0.1, 0.05, 0.05, 0, 0.1, 0)]
    for a, ax, ay, x0, y0, ang in ellipses:
        ax *= rng.uniform(0.85, 1.15)
        ay *= rng.uniform(0.85, 1.15)
        t = np.deg2rad(ang + rng.uniform(-10, 10))
        xr = (xx - x0) * np.cos(t) + (yy - y0) * np.sin(t)
        yr = -(xx - x0) * np.sin(t) + (yy - y0) * np.cos(t)
        img[(xr / ax) ** 2 + (yr / ay) ** 2 <= 1] += a
    img += rng.normal(0, 0.02, img.shape)
    img = (img - img.min()) / (img.max() - img.min())
    return (img * 255).astype(np.uint8)


def _document(rng: np.random.Generator) -> Image.Image:
    img = Image.new("L", (850, 1100), 255)
    d = ImageDraw.Draw(img)
    y = 60
    while y < 1040:
        line = " ".join(rng.choice(WORDS, size=int(rng.integers(4, 12))))
        d.text((60, y), line, fill=int(rng.integers(0, 60)))
        y += int(rng.integers(14, 28))
    return img


def _screenshot(rng: np.random.Generator, path: Path) -> None:
    fig, axes = plt.subplots(1, int(rng.integers(1, 3)), figsize=(8, 5))
    for ax in np.atleast_1d(axes):
        kind = rng.integers(0, 3)
        if kind == 0:
            ax.plot(np.cumsum(rng.normal(size=100)))
        elif kind == 1:
            ax.bar(range(8), rng.uniform(1, 10, 8))
        else:
            ax.imshow(rng.random((20, 20)), cmap="viridis")
        ax.set_title("Dashboard " + " ".join(rng.choice(WORDS, 2)))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)

    def save(cat: str, name: str, img: Image.Image | np.ndarray) -> None:
        (out / cat).mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(img) if isinstance(img, np.ndarray) else img
        img.save(out / cat / name)

    from sklearn.datasets import load_digits, load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    sample = Path(matplotlib.get_data_path()) / "sample_data"
    photos += [Image.open(sample / n).convert("RGB") for n in
               ("grace_hopper.jpg", "logo2.png", "Minduka_Present_Blue_Pack.png")]
    for k, ph in enumerate(photos):
        save("photo", f"photo{k}_full.jpg", ph)
        save("photo", f"photo{k}_gray.png", ph.convert("L"))
        for j, c in enumerate(_crops(ph, 8, rng)):
            save("photo", f"photo{k}_crop{j}.jpg", c if j % 2 else c.convert("L"))
    raw = gzip.open(sample / "s1045.ima.gz").read()
    mr = np.frombuffer(raw, dtype=">u2").reshape(256, 256).astype(np.float64)
    for j in range(10):
        m = np.rot90(mr, j % 4)
        m = m[: 256 - j * 8, j * 4:]
        save("mr_slice", f"mr{j}.png", (m / m.max() * 255).astype(np.uint8))
    for name in ("topobathy.npz", "jacksboro_fault_dem.npz"):
        with np.load(sample / name) as z:
            for j, key in enumerate(k for k in z.files if z[k].ndim == 2):
                e = z[key].astype(np.float64)
                for r in range(5):
                    e2 = np.rot90(e, r)
                    save("elevation_map", f"{name[:5]}_{j}_{r}.png",
                         ((e2 - e2.min()) / (np.ptp(e2) or 1) * 255).astype(np.uint8))
    for j in range(25):
        save("ct_phantom", f"ct{j}.png", _phantom(rng))
    for j in range(20):
        save("document", f"doc{j}.png", _document(rng))
    for j in range(20):
        (out / "screenshot").mkdir(parents=True, exist_ok=True)
        _screenshot(rng, out / "screenshot" / f"screen{j}.png")
    digits = load_digits().images
    for j in range(20):
        save("digits", f"digit{j}.png", Image.fromarray((digits[j] / 16 * 255).astype(np.uint8)).resize((256, 256)))
    for j in range(20):
        size = (int(rng.integers(200, 900)), int(rng.integers(200, 900)))
        noise = (rng.random(size) * 255 if j % 2 else np.clip(rng.normal(128, 50, size), 0, 255)).astype(np.uint8)
        save("noise", f"noise{j}.png", noise)
    for j in range(15):
        level = int(rng.integers(0, 256))
        flat = np.full((400, 400), level, np.uint8)
        if j % 3 == 0:
            flat = np.clip(flat + rng.normal(0, 2, flat.shape), 0, 255).astype(np.uint8)
        save("blank", f"blank{j}.png", flat)
    yy, xx = np.mgrid[0:512, 0:512]
    patterns = [xx / 2, yy / 2, (xx + yy) / 4, ((xx // 32 + yy // 32) % 2) * 255, (np.sin(xx / 8) + 1) * 127,
                ((xx // 16) % 2) * 255, np.hypot(xx - 256, yy - 256) / 1.5]
    for j, pat in enumerate(patterns):
        save("pattern", f"pattern{j}.png", np.clip(pat, 0, 255).astype(np.uint8))
        save("pattern", f"pattern{j}_inv.png", 255 - np.clip(pat, 0, 255).astype(np.uint8))
    n = sum(len(files) for _, _, files in os.walk(out))
    print(f"wrote {n} images to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
