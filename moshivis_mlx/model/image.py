"""Images as users have them -> the SigLIP encoder's input.

What the official MoshiVis server does (kyuteye `server.py` at 8624f4e0):
decode the bytes to RGB uint8 with torchvision, resize to 448 x 448 with
torchvision's `Resize((448, 448), BICUBIC)` (a square resize that ignores the
aspect ratio, no crop; antialiased bicubic on tensors), then
`ToDtype(float32, scale=True)` and `Normalize(0.5, 0.5)`, i.e. `x / 255 * 2 - 1`.

Here: decode with Pillow (any format it opens; first frame of animations),
honour the EXIF orientation, convert every mode to RGB (alpha composited on
white, 16-bit scaled down), then the same resize, computed like PyTorch's
float path of `interpolate(mode="bicubic", antialias=True)` (what torchvision
runs on a GPU server; its uint8 CPU kernel can differ by a level or two)
followed by rounding back to uint8, then the same normalisation. Deliberate differences from the server: the EXIF orientation
is applied (the server shows the model the sensor's orientation) and
transparent pixels become white (the server keeps whatever colour hides
under them); JPEG decoders may also differ by a level here and there.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np

from .bicubic import antialiased_bicubic_taps

if TYPE_CHECKING:  # Pillow is imported when an image is actually read
    import PIL.Image

FIT_STRETCH = "stretch"  # square resize, aspect ratio ignored (official)
FIT_PAD = "pad"  # longer side to the size, grey bars around
FIT_CROP = "crop"  # shorter side to the size, centre cropped
FITS = (FIT_STRETCH, FIT_PAD, FIT_CROP)

UINT8_MAX = 255
UINT16_TO_UINT8 = 257  # 65535 / 255
BACKGROUND_WHITE = (255, 255, 255)  # what transparent pixels become
PAD_GREY = 128  # ~0 after normalisation: the bars carry no signal
SIGLIP_MEAN = 0.5
SIGLIP_STD = 0.5
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, "PIL.Image.Image", np.ndarray]


class ImageError(ValueError):
    """An image could not be read or used; the message names it and says what to do."""


# -- decoding --------------------------------------------------------------


def load_rgb(source: ImageSource) -> np.ndarray:
    """Any supported image -> RGB uint8 array (H, W, 3), upright, no alpha.

    `source` is a file path, the bytes of an image file, a `PIL.Image`, or a
    uint8 array (H, W, 3) (also (H, W), (H, W, 1) and (H, W, 4) with alpha).
    """
    from PIL import Image

    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        return _decode(_read_file(path), f"image file {str(path)!r}")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(bytes(source), "image bytes")
    if isinstance(source, Image.Image):
        return _pil_to_rgb(source, "PIL image")
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source)
    raise ImageError(
        f"cannot use a {type(source).__name__} as an image: pass a file path, the file's bytes, "
        "a PIL.Image or a uint8 array (H, W, 3)"
    )


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"image file {str(path)!r} does not exist; check the path") from None
    except IsADirectoryError:
        raise ImageError(f"{str(path)!r} is a directory, not an image file; pass one image file") from None
    except PermissionError:
        raise ImageError(f"image file {str(path)!r} cannot be read: permission denied") from None
    except OSError as e:
        raise ImageError(f"image file {str(path)!r} cannot be read ({e.strerror or e})") from None


def _decode(data: bytes, label: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageError(f"{label} is empty (0 bytes); pass a JPEG, PNG, WebP, GIF, BMP or TIFF image")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decode now: truncation shows up here, not later
    except Image.DecompressionBombError as e:
        raise ImageError(
            f"{label} is too large to decode safely ({e}). Shrink it, or if you trust it raise "
            "PIL.Image.MAX_IMAGE_PIXELS before loading it"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(
            f"{label} is not an image Pillow can read (or its header is damaged); "
            "pass a JPEG, PNG, WebP, GIF, BMP or TIFF image"
        ) from None
    except Exception as e:  # Pillow's decoders raise OSError, SyntaxError, ValueError, EOFError...
        raise ImageError(f"{label} is damaged or truncated ({e}); re-export or re-download it") from None
    return _pil_to_rgb(image, label)


def _pil_to_rgb(image, label: str) -> np.ndarray:
    from PIL import Image, ImageOps

    if image.width == 0 or image.height == 0:
        raise ImageError(f"{label} has no pixels ({image.width} x {image.height})")
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a corrupt EXIF block must not cost the picture
        pass
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or (mode == "I" and np.asarray(image).max() > UINT8_MAX):
        gray = np.clip(np.asarray(image, dtype=np.float64), 0, np.iinfo(np.uint16).max) / UINT16_TO_UINT8
        return np.repeat(np.round(gray).astype(np.uint8)[..., None], 3, axis=-1)
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND_WHITE + (UINT8_MAX,))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    from PIL import Image

    if array.dtype != np.uint8:
        raise ImageError(
            f"pixel arrays must be uint8 (got {array.dtype}); encoder features are 2-D (num_tokens, width)"
        )
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ImageError(f"pixel arrays must have shape (H, W, 3), (H, W, 4) or (H, W); got {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"pixel array has no pixels (shape {array.shape})")
    if array.ndim == 3 and array.shape[-1] == 3:
        return np.ascontiguousarray(array)
    return _pil_to_rgb(Image.fromarray(np.ascontiguousarray(array)), "pixel array")


# -- geometry --------------------------------------------------------------


def resize_bicubic(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (H, W, C) -> uint8 (height, width, C), as torchvision's antialiased
    bicubic `Resize` computes it in float32 (then clamped and rounded)."""
    if rgb.shape[:2] == (height, width):
        return rgb
    horizontal = _resample_axis(rgb, width, axis=1)
    out = _resample_axis(horizontal, height, axis=0)
    return np.round(np.clip(out, 0, UINT8_MAX)).astype(np.uint8)


def _resample_axis(x: np.ndarray, size: int, axis: int) -> np.ndarray:
    first, weights = antialiased_bicubic_taps(x.shape[axis], size)
    last_index = x.shape[axis] - 1
    shape = [1] * x.ndim
    shape[axis] = size
    out = np.zeros(x.shape[:axis] + (size,) + x.shape[axis + 1 :], np.float32)
    for k in range(weights.shape[1]):  # one tap at a time keeps memory at one output
        taps = np.take(x, np.minimum(first + k, last_index), axis=axis)
        out += weights[:, k].reshape(shape) * taps
    return out


def fit_square(rgb: np.ndarray, size: int, fit: str = FIT_STRETCH) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (size, size, 3) by one of FITS."""
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    h, w = rgb.shape[:2]
    if fit == FIT_STRETCH:
        return resize_bicubic(rgb, size, size)
    if fit == FIT_CROP:  # torchvision Resize(size) then CenterCrop(size)
        scale = size / min(h, w)
        nh, nw = (size, int(w * scale)) if h <= w else (int(h * scale), size)
        resized = resize_bicubic(rgb, nh, nw)
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
        return resized[top : top + size, left : left + size]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    canvas = np.full((size, size, 3), PAD_GREY, np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas[top : top + nh, left : left + nw] = resize_bicubic(rgb, nh, nw)
    return canvas


def normalize(rgb: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1], SigLIP's `(x / 255 - 0.5) / 0.5`."""
    return ((rgb.astype(np.float32) / UINT8_MAX - SIGLIP_MEAN) / SIGLIP_STD).astype(np.float32)


def preprocess(source: ImageSource, image_size: int, fit: str = FIT_STRETCH) -> np.ndarray:
    """Any supported image -> float32 (image_size, image_size, 3) in [-1, 1]."""
    return normalize(fit_square(load_rgb(source), image_size, fit))
