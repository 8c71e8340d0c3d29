"""preprocess.py: decoding every PIL mode to grayscale, EXIF orientation, stretch-resize, clear errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pneumoscan.errors import ImageError
from pneumoscan.predict import InputSpec
from pneumoscan.preprocess import equalize, is_image_file, load_image, open_image, resize_gray


@pytest.fixture(scope="module")
def gray() -> np.ndarray:
    """A 30 x 40 8-bit gray test pattern that uses the full 0..255 range."""
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(30, 40)).astype(np.uint8)
    arr[0, 0], arr[-1, -1] = 0, 255
    return arr


def save_png(img: Image.Image, path: Path) -> Path:
    img.save(path, format="PNG")
    return path


def decoded(path_or_bytes) -> np.ndarray:
    return np.asarray(open_image(path_or_bytes))


def test_grayscale_png(tmp_path, gray):
    path = save_png(Image.fromarray(gray), tmp_path / "g.png")
    np.testing.assert_array_equal(decoded(path), gray)


def test_rgb_with_equal_channels_gives_the_gray_back(tmp_path, gray):
    path = save_png(Image.fromarray(np.stack([gray] * 3, -1)), tmp_path / "rgb.png")
    np.testing.assert_array_equal(decoded(path), gray)


def test_rgb_uses_luminance_weights(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 255  # pure red
    out = decoded(save_png(Image.fromarray(rgb), tmp_path / "red.png"))
    assert np.all(np.abs(out.astype(int) - round(0.299 * 255)) <= 1)


def test_rgba_opaque_and_transparent(tmp_path, gray):
    rgba = np.dstack([gray, gray, gray, np.full_like(gray, 255)])
    np.testing.assert_array_equal(decoded(save_png(Image.fromarray(rgba), tmp_path / "a.png")), gray)
    rgba[..., 3] = 0  # fully transparent: composited onto black
    assert decoded(save_png(Image.fromarray(rgba), tmp_path / "t.png")).max() == 0


def test_palette_png(tmp_path, gray):
    img = Image.frombytes("P", (gray.shape[1], gray.shape[0]), gray.tobytes())
    img.putpalette([v for i in range(256) for v in (i, i, i)])
    path = save_png(img, tmp_path / "p.png")
    assert Image.open(path).mode == "P"
    np.testing.assert_array_equal(decoded(path), gray)


def test_16_bit_png_of_an_8_bit_image_comes_back_unchanged(tmp_path, gray):
    img = Image.fromarray(gray.astype(np.uint16) * 257)
    path = save_png(img, tmp_path / "i16.png")
    assert Image.open(path).mode.startswith("I")
    np.testing.assert_array_equal(decoded(path), gray)
    eight_bit = save_png(Image.fromarray(gray), tmp_path / "8.png")
    np.testing.assert_array_equal(load_image(path, 32), load_image(eight_bit, 32))


def test_12_bit_data_in_a_16_bit_container_uses_the_full_range(tmp_path):
    arr = np.linspace(0, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)
    out = decoded(save_png(Image.fromarray(arr), tmp_path / "12bit.png"))
    assert out.min() == 0 and out.max() == 255


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((24, 48), np.uint8)
    stored[:12] = 255  # bright top half as stored
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    img.save(path, format="JPEG", quality=95, exif=exif.tobytes())

    assert open_image(path).size == (24, 48)  # width and height swapped
    out = load_image(path, 32).astype(float)
    # Rotated clockwise, the stored top becomes the right side.
    assert out[:, -12:].mean() > 200 and out[:, :12].mean() < 50
    assert abs(out[:12].mean() - out[-12:].mean()) < 20


def test_stretch_resize_to_square(tmp_path):
    wide = np.zeros((100, 300), np.uint8)
    wide[:, 100:200] = 128
    wide[:, 200:] = 255
    path = save_png(Image.fromarray(wide), tmp_path / "wide.png")
    out = load_image(path, 48)
    assert out.shape == (48, 48) and out.dtype == np.uint8
    # a stretch keeps the three bands across the full width and height (no crop, no padding)
    for row in (0, 24, 47):
        assert out[row, :14].max() < 10
        assert abs(int(out[row, 24]) - 128) < 10
        assert out[row, -14:].min() > 245


@pytest.mark.parametrize("size", [32, 64, 224])
def test_real_image_shape(real_jpeg, size):
    out = load_image(real_jpeg, size)
    assert out.shape == (size, size) and out.dtype == np.uint8
    assert out.std() > 10  # an actual radiograph, not a blank


def test_result_is_a_writable_array(real_jpeg):
    """torch.from_numpy warns on read-only arrays, and callers may normalise in place."""
    out = load_image(real_jpeg, 32)
    assert out.flags.writeable
    out -= out.min()


def test_bytes_and_path_give_the_same_array(real_jpeg):
    np.testing.assert_array_equal(load_image(real_jpeg, 64), load_image(real_jpeg.read_bytes(), 64))


def test_full_resolution_original_is_stretched(fullres_dir):
    path = sorted((fullres_dir / "NORMAL").iterdir())[0]
    w, h = Image.open(path).size
    assert max(w, h) > 224
    out = load_image(path, 96)
    assert out.shape == (96, 96)
    assert out.std() > 10


@pytest.mark.parametrize("label", ["NORMAL", "PNEUMONIA"])
def test_full_size_original_matches_the_training_image(fullres_dir, train_dir, label):
    """The model trained on the data set's 224 px films, made from the originals by a plain stretch;
    a full-size original through our decoding (draft mode, grayscale, stretch) must give that film
    again, up to its JPEG noise. A letterbox, a crop or a different channel mix would be a shift
    between training and use (measured on all 240 originals: 2.2 grey levels on average)."""
    originals = sorted((fullres_dir / label).iterdir())[:6]
    for original in originals:
        ours = load_image(original, 224).astype(np.float32)
        theirs = load_image(train_dir / label / original.name, 224).astype(np.float32)
        assert np.abs(ours - theirs).mean() < 4.0, original.name
        assert abs(float((ours - theirs).mean())) < 1.0, original.name


def test_resize_gray_is_bilinear_stretch(gray):
    out = resize_gray(Image.fromarray(gray), 16)
    expected = np.asarray(Image.fromarray(gray).resize((16, 16), Image.BILINEAR))
    np.testing.assert_array_equal(out, expected)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="empty") as info:
        load_image(path, 64)
    assert str(path) in str(info.value)


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("patient notes, not an image")
    with pytest.raises(ImageError, match="not a recognised image") as info:
        load_image(path, 64)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.05])
def test_truncated_jpeg(tmp_path, real_jpeg, fraction):
    data = real_jpeg.read_bytes()
    path = tmp_path / "cut.jpeg"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ImageError, match="truncated") as info:
        load_image(path, 64)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="cannot read"):
        load_image(tmp_path / "nope.png", 64)


def test_tiny_image_is_refused(tmp_path):
    path = save_png(Image.new("L", (1, 1)), tmp_path / "dot.png")
    with pytest.raises(ImageError, match="too small"):
        load_image(path, 64)


def test_image_error_is_a_value_error():
    assert issubclass(ImageError, ValueError)


@pytest.mark.parametrize(("name", "expected"), [
    ("a.jpg", True), ("a.JPG", True), ("a.jpeg", True), ("a.JPEG", True), ("a.png", True), ("a.PNG", True),
    (".DS_Store", False), ("._a.jpg", False), ("a.txt", False), ("a.dcm", False), ("a", False),
])
def test_is_image_file(name, expected):
    assert is_image_file(Path("/x") / name) is expected


@pytest.mark.parametrize("in_channels", [1, 3])
def test_input_spec_to_tensor(in_channels):
    images = torch.tensor([[[0, 255], [51, 102]]], dtype=torch.uint8)
    x = InputSpec(32, mean=0.5, std=0.25, in_channels=in_channels).to_tensor(images)
    assert x.shape == (1, in_channels, 2, 2)
    expected = (torch.tensor([[0.0, 1.0], [0.2, 0.4]]) - 0.5) / 0.25
    for c in range(in_channels):
        torch.testing.assert_close(x[0, c], expected)


def _monotone_pair(film: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A film on 128 grey levels and the same film through a strictly increasing contrast curve (gamma 0.6)."""
    coarse = film // 2
    curve = np.round(255.0 * (np.arange(128) / 127.0) ** 0.6).astype(np.uint8)
    assert len(np.unique(curve)) == 128  # strictly increasing: no two levels merged
    return coarse, curve[coarse]


def test_equalize_gives_a_real_film_the_same_input_under_any_increasing_contrast_curve(real_jpeg):
    coarse, curved = _monotone_pair(load_image(real_jpeg, 224))
    assert abs(float(coarse.mean()) - float(curved.mean())) > 40  # the two files differ a lot
    eq, raw = InputSpec(224, 0.5, 0.29, 3, intensity="equalize"), InputSpec(224, 0.5, 0.29, 3)
    a, b = (torch.from_numpy(x)[None] for x in (coarse, curved))
    torch.testing.assert_close(eq.to_tensor(a), eq.to_tensor(b), rtol=0, atol=0)
    assert (raw.to_tensor(a) - raw.to_tensor(b)).abs().max() > 1.0  # without it the input moves


def test_equalize_values_are_mid_ranks_and_uint8_and_float_inputs_agree(real_jpeg):
    film = torch.from_numpy(load_image(real_jpeg, 64))[None]
    scaled = film.float().div(255.0).unsqueeze(1)
    out = equalize(scaled)
    spec = InputSpec(64, 0.0, 1.0, 1, intensity="equalize")
    torch.testing.assert_close(spec.to_tensor(film), spec.to_tensor(scaled))
    assert 0.0 < float(out.min()) and float(out.max()) < 1.0
    assert float(out.mean()) == pytest.approx(0.5, abs=1e-4)  # mid-ranks of all pixels average to one half
    # order kept: a darker pixel never gets a higher value
    order = film.flatten().argsort()
    assert bool((out.flatten()[order].diff() >= 0).all())
    torch.testing.assert_close(equalize(torch.full((2, 1, 8, 8), 0.3)), torch.full((2, 1, 8, 8), 0.5))
    # each film on its own histogram, not the batch's
    other = scaled * 0.5
    torch.testing.assert_close(equalize(torch.cat([scaled, other])),
                               torch.cat([out, equalize(other)]), rtol=0, atol=0)


def test_input_spec_refuses_an_unknown_intensity_and_old_specs_read_as_raw():
    with pytest.raises(ValueError, match="intensity"):
        InputSpec(64, 0.5, 0.25, 3, intensity="clahe")
    assert InputSpec.from_dict({"image_size": 64, "mean": 0.5, "std": 0.25, "in_channels": 3}).intensity == "raw"


def test_bytes_input_error_names_bytes():
    with pytest.raises(ImageError, match="<bytes>"):
        load_image(io.BytesIO(b"xx").getvalue(), 32)


def test_the_stored_size_follows_the_exif_orientation(real_jpeg, tmp_path):
    from pneumoscan.preprocess import decode_image

    img = Image.open(real_jpeg).convert("L").resize((300, 200))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned by 90 degrees
    img.save(tmp_path / "turned.jpg", exif=exif)
    img.save(tmp_path / "plain.jpg")
    turned, plain = decode_image(tmp_path / "turned.jpg", 64), decode_image(tmp_path / "plain.jpg", 64)
    assert turned.size == (200, 300) and plain.size == (300, 200)
    assert (turned.gray.width < turned.gray.height) and (plain.gray.width > plain.gray.height)


@pytest.mark.parametrize("fmt", ["WEBP", "TIFF", "GIF", "BMP"])
def test_formats_other_than_jpeg_png_and_dicom_are_refused_by_name(tmp_path, fmt):
    from pneumoscan.errors import ImageError
    from pneumoscan.preprocess import decode_image

    path = tmp_path / f"film.{fmt.lower()}"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(path, format=fmt)
    with pytest.raises(ImageError, match=f"a {fmt} image; JPEG, PNG or DICOM is expected"):
        decode_image(path.read_bytes())
