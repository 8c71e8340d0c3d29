"""Image decoding and model-input preparation: the one place both training and inference use.

An image becomes a grayscale uint8 array stretched to ``size`` x ``size`` (no aspect
ratio kept: that is how the reference 224 px training set was made from the originals,
and a bilinear stretch reproduces it best, measured on ``fullres_sample/``). The model
input is that array scaled to [0, 1], normalised with the training set's mean and std,
and replicated to the model's channel count. A model trained with ``intensity="equalize"`` first
has each film's grey levels replaced by their mid-rank in that film (``equalize``), so that any
monotone change of the grey scale (exposure, gamma, window, a vendor's contrast curve) gives it
the same input.
"""

from __future__ import annotations

import io
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .dicom import is_dicom, read_dicom
from .errors import ImageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
PREPROCESS_VERSION = "gray-stretch-bilinear-v2"
# Versions whose model inputs equal this one's for radiographs: v1 differed only for palette
# images with transparency (no JPEG, DICOM or grayscale PNG), so v1 models need no warning.
COMPATIBLE_PREPROCESS = ("gray-stretch-bilinear-v1", PREPROCESS_VERSION)
DEFAULT_NORMALIZATION = {"mean": 0.5, "std": 0.25}
# What a model's input grey levels are: "raw" as decoded, or "equalize"d per film (``equalize``).
INTENSITIES = ("raw", "equalize")

# Larger images are refused before their pixels are decoded (decompression bombs). Checked here,
# not through PIL's global Image.MAX_IMAGE_PIXELS, which an embedding application owns.
MAX_IMAGE_PIXELS = 100_000_000
READ_FORMATS = ("JPEG", "MPO", "PNG")  # MPO: a JPEG with extra frames, as some cameras write them


def is_image_file(path: Path) -> bool:
    """True for a visible file with an image extension (case-insensitive)."""
    name = path.name
    return not name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


class FolderVisits:
    """The real folders a listing of films has entered, from ``top``: a link to a folder is followed once, and
    a loop, or a second link to a folder already listed, is not (with a warning)."""

    def __init__(self, top: str | os.PathLike) -> None:
        self._seen = {os.path.realpath(top)}

    def first(self, folder: str | os.PathLike) -> bool:
        """Whether ``folder`` is to be listed: True the first time its real folder is met."""
        real = os.path.realpath(folder)
        if real in self._seen:
            log.warning("%s: already listed (a link loop, or a second link to it): not listed twice", folder)
            return False
        self._seen.add(real)
        return True


def is_input_file(path: Path) -> bool:
    """Images by extension, .dcm, and extension-less files that carry the DICOM preamble.

    A broken link or a file that cannot be opened counts as an input when its name could be
    one, so that prediction reports it instead of the listing dropping it unseen.
    """
    if is_image_file(path):
        return True
    if path.name.startswith("."):
        return False
    suffix = path.suffix.lower()
    if suffix in (".dcm", ".dicom"):
        return True
    if suffix == "" or suffix[1:].isdigit():
        if not path.is_file():  # broken link, FIFO, socket: never opened here (a FIFO would block)
            return True
        try:
            with open(path, "rb") as f:
                return is_dicom(f.read(132))
        except OSError:
            return True  # unreadable: let prediction report why
    return False


def _high_bit_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale integer/float pixel data wider than 8 bits to 0..255 by its apparent bit depth.

    The bit depth is the smallest of 8, 10, 12, 14, 16 that holds the maximum value, so a
    12-bit radiograph in a 16-bit container is not rendered four times too dark, and an
    8-bit image widened by x257 comes back unchanged.
    """
    arr = arr.astype(np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0 or not math.isfinite(hi):
        span = hi - lo if hi > lo else 1.0
        return np.clip((arr - lo) / span * 255.0 + 0.5, 0, 255).astype(np.uint8)
    bits = next((b for b in (8, 10, 12, 14, 16) if hi < 2**b), 16)
    return np.clip(arr / (2**bits - 1) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def colorfulness(rgb: np.ndarray) -> float:
    """Hasler & Suesstrunk (2003) colourfulness of an (H, W, 3) image; 0 for any gray image."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    rg, yb = r - g, 0.5 * (r + g) - b
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image as it is shown, its EXIF orientation applied (a 90-degree turn swaps them)."""
    try:
        turned = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except Exception:  # unreadable EXIF: to_grayscale reports it, if it matters
        turned = False
    return (img.height, img.width) if turned else (img.width, img.height)


def to_grayscale(img: Image.Image) -> tuple[Image.Image, float]:
    """Any PIL mode (1, L, P, RGB, RGBA, LA, CMYK, I;16, I, F) to 8-bit 'L', orientation applied.

    Returns the grayscale image and the colourfulness of the source (0 for gray sources),
    which the out-of-scope gate uses: radiographs carry no colour.
    """
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(_high_bit_to_uint8(np.asarray(img))), 0.0
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    if img.mode in ("L", "1", "LA"):
        return img.convert("L"), 0.0
    rgb = img.convert("RGB")
    thumb = rgb.copy()
    thumb.thumbnail((256, 256))
    return rgb.convert("L"), colorfulness(np.asarray(thumb))


@dataclass
class DecodedImage:
    """A decoded input: 8-bit grayscale at original geometry, plus what the gate and results need."""

    gray: Image.Image
    colorfulness: float = 0.0
    source_format: str = ""
    dicom: Any = None
    stored_size: tuple[int, int] | None = None  # (width, height) in the file, as shown; ``gray`` may be reduced

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the image as stored in its file."""
        return self.stored_size or self.gray.size


def special_file_reason(path: Path) -> str:
    """Why ``path`` must not be read (a pipe, socket or device: a FIFO would block the read), or ""."""
    if path.exists() and not path.is_file() and not path.is_dir():
        return "not a regular file (a pipe, socket or device); copy the image to a file"
    return ""


def _read_file(path: Path) -> bytes:
    """The bytes of a regular file; a broken link or a special file raises ImageError (a FIFO would block)."""
    if path.is_symlink() and not path.exists():
        raise ImageError(f"{path}: broken symbolic link (its target {os.readlink(path)!r} does not exist)")
    special = special_file_reason(path)
    if special:
        raise ImageError(f"{path}: {special}")
    return path.read_bytes()


def decode_image(source: str | os.PathLike | bytes, size: int | None = None) -> DecodedImage:
    """Decode a file or bytes (JPEG, PNG, DICOM) into grayscale at original geometry.

    With ``size``, JPEGs are decoded in draft mode at the smallest scale still at least
    ``size`` on both sides (fast for multi-megapixel originals).

    Raises:
        ImageError: empty, truncated, unknown-format or otherwise undecodable data.
    """
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        data = source if isinstance(source, bytes) else _read_file(Path(source))
    except OSError as exc:
        raise ImageError(f"{name}: cannot read file ({exc.strerror or exc})") from exc
    if not data:
        raise ImageError(f"{name}: file is empty (0 bytes)")
    if is_dicom(data):
        gray, info = read_dicom(data, name)
        return DecodedImage(gray, info.colorfulness, "DICOM", info)
    try:
        with warnings.catch_warnings():
            # PIL's own bomb warning depends on a global limit; ours is checked just below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        if img.format not in READ_FORMATS:  # PIL opens many more (WebP, TIFF pages, GIF frames): none validated
            raise ImageError(f"{name}: a {img.format} image; JPEG, PNG or DICOM is expected (save the film as PNG, "
                             f"or export it as DICOM)")
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise ImageError(f"{name}: image is {img.width}x{img.height} pixels, more than the "
                             f"{MAX_IMAGE_PIXELS} allowed (a decompression bomb?); downsample it first")
        stored = oriented_size(img)
        if size is not None and img.format == "JPEG":
            img.draft(img.mode, (size, size))
        img.load()
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name}: not a recognised image (expected JPEG, PNG or DICOM)") from exc
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:  # PIL's own limit, met before ours could be checked
        raise ImageError(f"{name}: image has more than the {MAX_IMAGE_PIXELS} pixels allowed ({exc}); "
                         f"downsample it first") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: cannot decode image, file may be truncated or corrupt ({exc})") from exc
    if img.width < 2 or img.height < 2:
        raise ImageError(f"{name}: image is {img.width}x{img.height} pixels, too small to be a radiograph")
    try:
        gray, colour = to_grayscale(img)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError) as exc:  # e.g. corrupt EXIF, odd modes
        raise ImageError(f"{name}: cannot convert {img.mode} image to grayscale ({exc})") from exc
    return DecodedImage(gray, colour, img.format or "", stored_size=stored)


def open_image(source: str | os.PathLike | bytes, size: int | None = None) -> Image.Image:
    """Decode a file or bytes into a grayscale PIL image at original geometry (see ``decode_image``)."""
    return decode_image(source, size).gray


def resize_gray(img: Image.Image, size: int) -> np.ndarray:
    """Stretch-resize a grayscale image to ``size`` x ``size`` uint8 (bilinear, antialiased)."""
    return np.array(img.resize((size, size), Image.BILINEAR), dtype=np.uint8)  # a writable copy


def load_image(source: str | os.PathLike | bytes, size: int) -> np.ndarray:
    """Decode an image file (or bytes) into the model's square uint8 grayscale array."""
    return resize_gray(open_image(source, size), size)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """Per-film histogram equalisation of float images in [0, 1] shaped (N, 1, H, W).

    Grey levels are quantised to 256 (exactly the stored levels for 8-bit inputs) and each pixel
    becomes the mid-rank of its level in its film: (pixels below + half the pixels at the level) /
    pixels, a value in (0, 1). A strictly increasing change of the levels a film uses leaves the
    output unchanged; a uniform film maps to 0.5.
    """
    n = x.shape[0]
    if n == 0:
        return x.clone()
    levels = (x * 255.0).round_().clamp_(0, 255).long().reshape(n, -1)
    hist = torch.zeros((n, 256), dtype=torch.float32, device=x.device)
    hist.scatter_add_(1, levels, torch.ones_like(levels, dtype=torch.float32))
    mid = (hist.cumsum(1) - 0.5 * hist) / levels.shape[1]
    return mid.gather(1, levels).reshape(x.shape)
