"""Images as users have them: formats, orientation, colour modes, the official
resize, the fit options, and one clear error for each kind of bad image."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import moshivis_mlx
from moshivis_mlx.model.image import (
    FIT_CROP,
    FIT_PAD,
    PAD_GREY,
    ImageError,
    fit_square,
    load_rgb,
    normalize,
    preprocess,
    resize_bicubic,
)

from conftest import FIXTURE_A as FIXTURE
LOSSLESS = ["PNG", "BMP", "TIFF", "WEBP"]
SUFFIX = {"PNG": ".png", "BMP": ".bmp", "TIFF": ".tiff", "WEBP": ".webp", "JPEG": ".jpg", "GIF": ".gif"}


def pattern(h: int = 24, w: int = 40) -> np.ndarray:
    """A smooth, non-symmetric RGB picture (JPEG-friendly, orientation-revealing)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (h + w - 2)], -1).astype(np.uint8)


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


# -- formats and kinds of input ----------------------------------------------


@pytest.mark.parametrize("fmt", LOSSLESS)
def test_lossless_formats_exact(tmp_path, fmt):
    rgb = pattern()
    path = tmp_path / f"picture{SUFFIX[fmt]}"
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    Image.fromarray(rgb).save(path, fmt, **kwargs)
    np.testing.assert_array_equal(load_rgb(path), rgb)
    np.testing.assert_array_equal(load_rgb(str(path)), rgb)
    np.testing.assert_array_equal(load_rgb(path.read_bytes()), rgb)


def test_jpeg_close(tmp_path):
    rgb = pattern()
    path = tmp_path / "photo.jpg"
    Image.fromarray(rgb).save(path, quality=95)
    assert np.abs(load_rgb(path).astype(int) - rgb).mean() < 3


def test_gif_first_frame():
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    blue = Image.new("RGB", (8, 8), (0, 0, 255))
    data = encoded(red, "GIF", save_all=True, append_images=[blue], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    np.testing.assert_array_equal(load_rgb(data), np.asarray(red))


def test_pil_and_array_inputs():
    rgb = pattern()
    np.testing.assert_array_equal(load_rgb(Image.fromarray(rgb)), rgb)
    np.testing.assert_array_equal(load_rgb(rgb), rgb)
    np.testing.assert_array_equal(load_rgb(rgb[..., 0]), np.repeat(rgb[..., :1], 3, -1))  # (H, W) grey


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_honoured(fmt):
    rgb = pattern(24, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the picture must be turned 90 degrees clockwise to be seen
    data = encoded(Image.fromarray(rgb), fmt, exif=exif.tobytes())
    loaded = load_rgb(data)
    upright = np.rot90(rgb, k=-1)
    assert loaded.shape == upright.shape == (40, 24, 3)
    assert np.abs(loaded.astype(int) - upright).mean() < (0.01 if fmt == "PNG" else 3)


# -- colour modes ---------------------------------------------------------------


def test_grayscale_and_palette():
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    np.testing.assert_array_equal(load_rgb(encoded(Image.fromarray(grey), "PNG")), np.repeat(grey[..., None], 3, -1))
    palette = Image.fromarray(pattern()).quantize(16)
    assert palette.mode == "P"
    np.testing.assert_array_equal(load_rgb(encoded(palette, "PNG")), np.asarray(palette.convert("RGB")))


def test_cmyk():
    cmyk = np.zeros((4, 4, 4), np.uint8)
    cmyk[..., 0], cmyk[..., 1], cmyk[..., 2] = 10, 100, 200  # no black: RGB = 255 - CMY
    data = encoded(Image.fromarray(cmyk, "CMYK"), "TIFF")
    np.testing.assert_array_equal(load_rgb(data)[0, 0], [245, 155, 55])


def test_sixteen_bit_scaled_not_clipped():
    values = np.array([[0, 257 * 100, 65535, 257 * 200]], np.uint16)
    data = encoded(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    np.testing.assert_array_equal(load_rgb(data)[0, :, 0], [0, 100, 255, 200])


def test_alpha_composited_on_white():
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = (0, 0, 200)
    rgba[0, 0, 3], rgba[0, 1, 3], rgba[0, 2, 3] = 0, 255, 128
    rgb = load_rgb(encoded(Image.fromarray(rgba, "RGBA"), "PNG"))
    np.testing.assert_array_equal(rgb[0, 0], [255, 255, 255])  # transparent -> white
    np.testing.assert_array_equal(rgb[0, 1], [0, 0, 200])  # opaque -> itself
    half = 128 / 255
    expected = np.array([0, 0, 200]) * half + 255 * (1 - half)
    assert np.abs(rgb[0, 2] - expected).max() <= 1
    np.testing.assert_array_equal(load_rgb(rgba)[0, 0], [255, 255, 255])  # (H, W, 4) arrays too
    la = Image.fromarray(np.array([[[0, 0], [50, 255]]], np.uint8), "LA")
    np.testing.assert_array_equal(load_rgb(la)[0], [[255, 255, 255], [50, 50, 50]])


def test_palette_transparency_composited_on_white():
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    data = encoded(image, "GIF", transparency=0)
    np.testing.assert_array_equal(load_rgb(data)[0], [[255, 255, 255], [10, 20, 30]])


# -- resize, fit, normalisation ---------------------------------------------------


def torch_official_resize(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """torchvision's Resize((h, w), BICUBIC) on a uint8 tensor, float path (GPU server)."""
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    y = torch.nn.functional.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return y.clamp(0, 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("shape, size", [((300, 200), (448, 448)), ((901, 1203), (448, 448)), ((50, 60), (112, 96))])
def test_resize_matches_official(shape, size):
    rgb = np.random.default_rng(sum(shape)).integers(0, 256, shape + (3,), dtype=np.uint8)
    ours = resize_bicubic(rgb, *size).astype(int)
    expected = torch_official_resize(rgb, *size).astype(int)
    # Same float32 weights; only summation order differs, which can flip a
    # rounding tie now and then (noise images are the worst case).
    assert np.abs(ours - expected).max() <= 1
    assert (ours != expected).mean() < 1e-3


def test_stretch_is_square_and_default():
    rgb = pattern(30, 90)
    out = preprocess(rgb, 56)
    assert out.shape == (56, 56, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, normalize(resize_bicubic(rgb, 56, 56)))


def test_pad_keeps_aspect_ratio():
    white = np.full((50, 100, 3), 255, np.uint8)
    out = fit_square(white, 40, FIT_PAD)
    assert out.shape == (40, 40, 3)
    np.testing.assert_array_equal(out[:10], PAD_GREY)  # bars above and below
    np.testing.assert_array_equal(out[30:], PAD_GREY)
    np.testing.assert_array_equal(out[10:30], 255)


def test_crop_keeps_the_centre():
    bands = np.zeros((100, 300, 3), np.uint8)
    bands[:, :100, 0] = 255
    bands[:, 100:200, 1] = 255
    bands[:, 200:, 2] = 255
    out = fit_square(bands, 100, FIT_CROP)
    assert out.shape == (100, 100, 3)
    np.testing.assert_array_equal(out[..., 1], 255)
    np.testing.assert_array_equal(out[..., [0, 2]], 0)


def test_normalised_range():
    extremes = np.array([[[0, 255, 0]]], np.uint8)
    np.testing.assert_array_equal(normalize(extremes), [[[-1.0, 1.0, -1.0]]])


def test_unknown_fit_rejected():
    with pytest.raises(ValueError, match="fit must be one of"):
        fit_square(pattern(), 56, "zoom")


# -- bad images: one clear error each -----------------------------------------------


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is text, not a picture")
    with pytest.raises(ImageError, match=r"notes\.jpg.*not an image Pillow can read"):
        load_rgb(path)


def test_truncated_file(tmp_path):
    data = encoded(Image.fromarray(pattern(64, 64)), "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut\.png.*damaged or truncated"):
        load_rgb(path)


def test_zero_size_image():
    with pytest.raises(ImageError, match="no pixels"):
        load_rgb(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageError, match="no pixels"):
        load_rgb(np.zeros((0, 4, 3), np.uint8))


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.png.*empty \(0 bytes\)"):
        load_rgb(path)


def test_decompression_bomb(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels > 2 x limit: Pillow refuses
    with pytest.raises(ImageError, match=r"huge\.png.*too large.*MAX_IMAGE_PIXELS"):
        load_rgb(path)


def test_unreadable_paths(tmp_path):
    with pytest.raises(ImageError, match=r"missing\.jpg.*does not exist"):
        load_rgb(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match="is a directory"):
        load_rgb(tmp_path)


def test_wrong_kinds_of_input():
    with pytest.raises(ImageError, match="cannot use a int"):
        load_rgb(42)
    with pytest.raises(ImageError, match="must be uint8"):
        load_rgb(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ImageError, match=r"shape \(H, W, 3\)"):
        load_rgb(np.zeros((8, 8, 5), np.uint8))


def test_errors_reach_the_public_api(tmp_path):
    model = moshivis_mlx.load(FIXTURE, dtype="float32")
    with pytest.raises(ImageError, match="does not exist"):
        model.embed_image(tmp_path / "missing.jpg")
    stream = model.stream(image=pattern(56, 56))
    before = stream.image
    with pytest.raises(ImageError, match="not an image"):
        stream.set_image(b"GIF89a but not really")
    assert stream.image is before  # a failed switch keeps the current picture
