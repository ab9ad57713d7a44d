"""Bicubic resampling weights, computed the way PyTorch computes them.

Two flavours are needed, and they are not the same filter:

* `bicubic_matrix`: `torch.nn.functional.interpolate(mode="bicubic",
  align_corners=False)` without antialiasing (Keys kernel with a = -0.75,
  border pixels repeated). `transformers` resizes SigLIP's grid of position
  embeddings with it.
* `antialiased_bicubic_taps`: the same call with `antialias=True` (Keys kernel
  with a = -0.5, widened by the scale when shrinking, weights renormalised at
  the borders), which torchvision's `Resize(..., BICUBIC)` uses on tensors and
  which Pillow's BICUBIC filter also follows. The official MoshiVis server
  resizes images with it.

Both are plain numpy. Positions and weights are computed in float32, in the
order PyTorch computes them for float32 tensors, so that results agree to the
last bits rather than only to ~1e-5 (which would flip the rounding of a few
uint8 pixels).
"""

from __future__ import annotations

import numpy as np

KEYS_A_PLAIN = -0.75  # PyTorch's bicubic without antialiasing
KEYS_A_ANTIALIAS = -0.5  # PyTorch's antialiased bicubic (and Pillow's)
CUBIC_RADIUS = 2.0  # the Keys kernel is zero beyond 2 input pixels
_F32 = np.float32


def keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel, in the dtype of `x`."""
    x = np.abs(x)
    a = x.dtype.type(a)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < CUBIC_RADIUS, far, 0)).astype(x.dtype)


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) matrix M with `out = M @ in` along one axis, equal to
    `F.interpolate(mode="bicubic", align_corners=False)` (no antialias)."""
    scale = _F32(in_size) / _F32(out_size)
    source = scale * (np.arange(out_size, dtype=_F32) + _F32(0.5)) - _F32(0.5)  # not clamped for cubic
    base = np.floor(source)
    t = source - base
    matrix = np.zeros((out_size, in_size), _F32)
    rows = np.arange(out_size)
    for offset in (-1, 0, 1, 2):
        index = np.clip(base.astype(np.int64) + offset, 0, in_size - 1)  # borders repeat
        np.add.at(matrix, (rows, index), keys_cubic(t - offset, KEYS_A_PLAIN))
    return matrix


def antialiased_bicubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Sparse form of `F.interpolate(mode="bicubic", antialias=True, align_corners=False)`
    along one axis: (first input index (out,), weights (out, taps)).

    Output pixel i is `sum_k weights[i, k] * in[first[i] + k]`; unused taps have
    weight 0 and an index clipped into range.
    """
    half = _F32(0.5)
    scale = _F32(in_size) / _F32(out_size)
    shrinking = scale >= 1
    support = _F32(CUBIC_RADIUS) * scale if shrinking else _F32(CUBIC_RADIUS)
    inv_scale = _F32(1) / scale if shrinking else _F32(1)
    center = scale * (np.arange(out_size, dtype=_F32) + half)
    first = np.maximum((center - support + half).astype(np.int64), 0)  # truncation, as torch
    last = np.minimum((center + support + half).astype(np.int64), in_size)
    num_taps = int((last - first).max())
    k = np.arange(num_taps)
    offsets = (first[:, None] + k).astype(_F32) - center[:, None] + half
    weights = keys_cubic(offsets * inv_scale, KEYS_A_ANTIALIAS)
    weights = np.where(k < (last - first)[:, None], weights, _F32(0))
    total = weights.sum(axis=1, keepdims=True, dtype=_F32)
    weights = np.divide(weights, total, out=np.zeros_like(weights), where=total != 0)
    return first, weights
