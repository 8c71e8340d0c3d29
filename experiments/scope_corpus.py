#!/usr/bin/env python
"""Make the negatives the scope classifier learns from (outlier exposure), beside experiments/ood_corpus.py.

Writes ``OUT/<class>/<source>/<name>.png``:

- ``non_radiograph/skimage``: the sample images scikit-image ships in its wheel (portraits, a cameraman,
  200 small face/non-face crops from LFW, a retina fundus photo, histology, cells, a page of text, the
  moon, textures, ...), in grayscale and colour, whole and cropped. The wheel is read as a zip, never
  installed: ``pip download scikit-image==0.26.0 --no-deps -d ~/.cache/pneumoscan/wheels``.
- ``non_radiograph/dicom_samples``: the CT, MR and other sample images pydicom ships, rendered to PNG
  with a few windows, rotations and crops (CT/MR slices saved as ordinary images).
- ``non_radiograph/rendered``: documents and dashboards rendered at several font sizes and layouts.
- ``altered_chest/ped_{train,val}``: pediatric frontal films rotated by 90/180/270 degrees, inverted,
  cut to a horizontal or vertical strip, or to one half: not valid inputs.
- ``other_body/ped_{train,val}``: crops of a pediatric film that show another region: one shoulder,
  the abdomen, the neck.

The pediatric transforms are made from ``fullres_sample/`` (full size) and from some 224 px training
images, and are filed under ``ped_train`` or ``ped_val`` by the patient's side of the shipped model's
own split (or ``--model_path``'s), so that a classifier fitted on ``ped_train`` is measured on patients it
never saw.

    python experiments/scope_corpus.py --out /tmp/scope_corpus
"""

from __future__ import annotations

import argparse
import glob
import io
import logging
import zipfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFont, ImageOps  # noqa: E402

from pneumoscan.checkpoint import default_model_path, load_checkpoint  # noqa: E402
from pneumoscan.cli import configure_logging  # noqa: E402
from pneumoscan.data import patient_id, split_from_config  # noqa: E402
from pneumoscan.preprocess import decode_image  # noqa: E402

log = logging.getLogger("pneumoscan.scope_corpus")

WORDS = ("patient name date of birth study chest xray report findings impression lungs clear heart size normal "
         "no acute cardiopulmonary process follow up clinic invoice total amount due account signature page "
         "laboratory haemoglobin white cell count platelets sodium potassium creatinine medication dose").split()


def _save(out: Path, cls: str, source: str, name: str, img: Image.Image | np.ndarray) -> None:
    folder = out / cls / source
    folder.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(img) if isinstance(img, np.ndarray) else img).save(folder / f"{name}.png")


def _crop(img: Image.Image, rng: np.random.Generator, lo: float = 0.35, hi: float = 0.9) -> Image.Image:
    w, h = img.size
    cw, ch = max(8, int(w * rng.uniform(lo, hi))), max(8, int(h * rng.uniform(lo, hi)))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return img.crop((x, y, x + cw, y + ch))


def skimage_images(wheel: Path, out: Path, rng: np.random.Generator) -> int:
    """Sample images from the scikit-image wheel: each whole (gray and colour) and in crops."""
    n = 0
    with zipfile.ZipFile(wheel) as z:
        names = sorted(p for p in z.namelist() if p.startswith("skimage/data/")
                       and p.rsplit(".", 1)[-1] in ("png", "jpg") and z.getinfo(p).file_size > 4000)
        for p in names:
            stem = Path(p).stem
            img = Image.open(io.BytesIO(z.read(p)))
            img = img.convert("RGB") if img.mode not in ("L", "RGB") else img
            _save(out, "non_radiograph", "skimage", f"{stem}_gray", img.convert("L"))
            _save(out, "non_radiograph", "skimage", f"{stem}_full", img)
            for j in range(6):
                c = _crop(img, rng)
                _save(out, "non_radiograph", "skimage", f"{stem}_crop{j}", c.convert("L") if j % 3 else c)
            n += 8
        faces = np.load(io.BytesIO(z.read("skimage/data/lfw_subset.npy")))  # 100 faces, then 100 non-faces
        for j, f in enumerate(faces):
            size = int(rng.integers(96, 400))
            img = Image.fromarray((f * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
            _save(out, "non_radiograph", "skimage", f"lfw{j:03d}", img)
            n += 1
    return n


def dicom_images(out: Path, rng: np.random.Generator) -> int:
    """CT, MR and other sample slices shipped with pydicom, rendered as ordinary images."""
    import pydicom
    from pydicom.data import get_testdata_file

    n = 0
    for name in ("CT_small.dcm", "MR_small.dcm", "liver_1frame.dcm", "JPEG2000.dcm", "693_J2KI.dcm",
                 "JPGExtended.dcm", "examples_jpeg2k.dcm", "rtdose_1frame.dcm", "image_dfl.dcm"):
        try:
            arr = pydicom.dcmread(get_testdata_file(name)).pixel_array.astype(np.float64)
        except Exception as exc:  # a sample that needs a decoder we lack is skipped, not fatal
            log.warning("skipping %s (%s)", name, exc)
            continue
        arr = arr[0] if arr.ndim == 3 and arr.shape[-1] not in (3, 4) else arr
        arr = arr.mean(-1) if arr.ndim == 3 else arr
        for j in range(8):
            lo, hi = np.quantile(arr, [rng.uniform(0, 0.3), rng.uniform(0.9, 1.0)])
            img = np.clip((arr - lo) / max(hi - lo, 1e-6), 0, 1)
            img = np.rot90(img, j % 4)
            pil = Image.fromarray((img * 255).astype(np.uint8)).resize(
                (int(rng.integers(256, 700)),) * 2, Image.BILINEAR)
            _save(out, "non_radiograph", "dicom_samples", f"{Path(name).stem}_{j}",
                  _crop(pil, rng, 0.6, 1.0) if j >= 4 else pil)
            n += 1
    return n


def rendered_images(out: Path, rng: np.random.Generator, count: int = 60) -> int:
    """Documents (black on white and inverted) and dashboards, at several font sizes."""
    for j in range(count // 2):
        w, h = int(rng.integers(500, 1200)), int(rng.integers(500, 1400))
        img = Image.new("L", (w, h), int(rng.integers(200, 256)))
        d = ImageDraw.Draw(img)
        size = int(rng.integers(10, 40))
        font = ImageFont.load_default(size=size)
        y = int(rng.integers(10, 60))
        while y < h - size:
            d.text((int(rng.integers(10, 60)), y), " ".join(rng.choice(WORDS, int(rng.integers(2, 10)))),
                   fill=int(rng.integers(0, 80)), font=font)
            y += int(size * rng.uniform(1.2, 2.0))
        if j % 4 == 3:
            img = ImageOps.invert(img)
        _save(out, "non_radiograph", "rendered", f"doc{j:02d}", img)
    for j in range(count - count // 2):
        fig, ax = plt.subplots(figsize=(rng.uniform(4, 10), rng.uniform(3, 8)))
        kind = j % 4
        if kind == 0:
            ax.plot(np.cumsum(rng.normal(size=(200, 3)), 0))
        elif kind == 1:
            ax.hist(rng.normal(size=500), bins=30, color="gray")
        elif kind == 2:
            ax.imshow(rng.random((30, 30)), cmap="gray")
        else:
            ax.scatter(*rng.normal(size=(2, 200)), s=5, c="k")
        ax.set_title(" ".join(rng.choice(WORDS, 3)))
        buf = io.BytesIO()
        fig.savefig(buf, dpi=int(rng.integers(60, 120)), format="png")
        plt.close(fig)
        _save(out, "non_radiograph", "rendered", f"chart{j:02d}", Image.open(buf).convert("L"))
    return count


def _altered(img: Image.Image, k: int, rng: np.random.Generator) -> tuple[str, Image.Image]:
    w, h = img.size
    kind = ("rot90", "rot180", "rot270", "inverted", "hstrip", "vstrip", "half")[k % 7]
    if kind.startswith("rot"):
        return kind, img.rotate(int(kind[3:]), expand=True)
    if kind == "inverted":
        return kind, ImageOps.invert(img)
    if kind == "hstrip":
        bh = int(h * rng.uniform(0.12, 0.3))
        y = int(rng.integers(0, h - bh))
        return kind, img.crop((0, y, w, y + bh))
    if kind == "vstrip":
        bw = int(w * rng.uniform(0.12, 0.3))
        x = int(rng.integers(0, w - bw))
        return kind, img.crop((x, 0, x + bw, h))
    return kind, img.crop((0, 0, w // 2, h)) if rng.random() < 0.5 else img.crop((w // 2, 0, w, h))


def _other_region(img: Image.Image, k: int, rng: np.random.Generator) -> tuple[str, Image.Image]:
    w, h = img.size
    kind = ("shoulder", "abdomen", "neck")[k % 3]
    if kind == "shoulder":
        cw, ch = int(w * rng.uniform(0.25, 0.4)), int(h * rng.uniform(0.25, 0.4))
        x = 0 if rng.random() < 0.5 else w - cw
        y = int(h * rng.uniform(0.0, 0.15))
        return kind, img.crop((x, y, x + cw, y + ch))
    if kind == "abdomen":
        ch = int(h * rng.uniform(0.25, 0.4))
        x0 = int(w * rng.uniform(0.1, 0.25))
        return kind, img.crop((x0, h - ch, w - x0, h))
    ch, cw = int(h * rng.uniform(0.2, 0.3)), int(w * rng.uniform(0.3, 0.5))
    x = (w - cw) // 2
    return kind, img.crop((x, 0, x + cw, ch))


def pediatric_transforms(data_root: Path, out: Path, rng: np.random.Generator, per_fullres: int,
                         n_small: int, model_path: str | None = None) -> int:
    """Invalid variants of pediatric films, filed by the patient's side of the model's own split."""
    ckpt = load_checkpoint(model_path or default_model_path())
    splits = split_from_config(ckpt["config"], str(data_root / "chest_xray"), 224)
    val_patients = set(splits.val.patients)
    n = 0
    fullres = sorted((data_root / "fullres_sample").glob("*/*.jpeg"))
    for i, path in enumerate(fullres):
        side = "ped_val" if patient_id(path.name) in val_patients else "ped_train"
        gray = decode_image(path).gray
        for k in range(per_fullres):
            kind, img = (_altered(gray, i + k, rng) if k % 2 == 0 else _other_region(gray, i + k, rng))
            cls = "altered_chest" if k % 2 == 0 else "other_body"
            _save(out, cls, side, f"{path.stem}_{kind}_{k}", img)
            n += 1
    for side, imageset in (("ped_train", splits.train), ("ped_val", splits.val)):
        count = n_small if side == "ped_train" else max(1, n_small // 5)
        for j in rng.choice(len(imageset), size=min(count, len(imageset)), replace=False):
            gray = Image.fromarray(imageset.images[int(j)].numpy())
            stem = Path(imageset.paths[int(j)]).stem
            kind, img = (_altered(gray, int(j), rng) if j % 2 == 0 else _other_region(gray, int(j), rng))
            _save(out, "altered_chest" if j % 2 == 0 else "other_body", side, f"{stem}_{kind}_s", img)
            n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--data_root", default="../shared/data", help="holds chest_xray/ and fullres_sample/")
    p.add_argument("--model_path", default=None, help="whose train/validation split files the transforms "
                                                      "(default: the shipped model)")
    p.add_argument("--skimage_wheel", default=None,
                   help="scikit-image wheel (default: the newest under ~/.cache/pneumoscan/wheels)")
    p.add_argument("--per_fullres", type=int, default=6, help="invalid variants per full-size film")
    p.add_argument("--n_small", type=int, default=1000, help="invalid variants of 224 px training films")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    configure_logging()
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    wheel = args.skimage_wheel or next(iter(sorted(glob.glob(str(Path.home() / ".cache/pneumoscan/wheels/"
                                                                 "scikit_image-*.whl")), reverse=True)), None)
    if wheel:
        log.info("skimage: %d images", skimage_images(Path(wheel), out, rng))
    else:
        log.warning("no scikit-image wheel found: its sample images are left out (see --help)")
    log.info("dicom samples: %d images", dicom_images(out, rng))
    log.info("rendered: %d images", rendered_images(out, rng))
    log.info("pediatric transforms: %d images",
             pediatric_transforms(Path(args.data_root), out, rng, args.per_fullres, args.n_small, args.model_path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
