"""Building blocks shared by the temporal transformer and the depformer.

Written as a GPU runs them: MLX layers and `mx.fast` kernels. Their CPU
counterparts are in `cpu.layers` (see `cpu.platform_path`)."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .config import NORM_MEAN_SQUARE, NORM_VARIANCE


class RMSNorm(nn.Module):
    """`x * weight / sqrt(mean(x^2) + eps)`, computed in float32 as upstream does."""

    def __init__(self, dim: int, eps: float = 1e-8):
        super().__init__()
        self.weight = mx.ones((dim,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        y = mx.fast.rms_norm(x.astype(mx.float32), self.weight.astype(mx.float32), self.eps)
        return y.astype(x.dtype)


class VarianceNorm(nn.Module):
    """`x * weight / sqrt(var(x) + eps)` with the unbiased variance, x not centred.

    This is what the official PyTorch code applies in the depformer (in float32)
    and to the image projection (`norm_xa`, in the input dtype).
    """

    def __init__(self, dim: int, eps: float, in_float32: bool = True):
        super().__init__()
        self.weight = mx.ones((dim,))
        self.eps = eps
        self.in_float32 = in_float32

    def __call__(self, x: mx.array) -> mx.array:
        h = x.astype(mx.float32) if self.in_float32 else x
        var = mx.var(h, axis=-1, keepdims=True, ddof=1)
        return (h * (self.weight.astype(h.dtype) * mx.rsqrt(var + self.eps))).astype(x.dtype)


def make_norm(kind: str, dim: int, eps: float, in_float32: bool = True) -> nn.Module:
    """The norm of `kind` (config.NORM_VARIANCE or NORM_MEAN_SQUARE)."""
    if kind == NORM_VARIANCE:
        return VarianceNorm(dim, eps, in_float32)
    if kind == NORM_MEAN_SQUARE:
        return RMSNorm(dim, eps)
    raise ValueError(f"unknown norm kind {kind!r}")


def embed_one(table: nn.Module, token: mx.array) -> mx.array:
    """Row `token` (an int array of shape (1,)) of an embedding table, as (1, dim).

    A float table gives it with one dynamic slice, where indexing builds a
    Gather and a Squeeze; a quantized table is called as it is.
    """
    if isinstance(table, nn.Embedding):
        return mx.slice(table.weight, token, axes=(0,), slice_size=(1, table.weight.shape[1]))
    return table(token)


class FusedQKVAttention(nn.Module):
    """The weights of a multi-head attention whose q, k and v come out of one
    product (`in_proj`, as the checkpoints store them); subclasses attend."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.in_proj = nn.Linear(dim, 3 * dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)


class GatedFFN(nn.Module):
    """`linear_out(silu(x W_gate) * (x W_up))` with W_gate, W_up stacked in `linear_in`."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.linear_out = nn.Linear(hidden, dim, bias=False)

    def hidden(self, x: mx.array) -> mx.array:
        gate, up = mx.split(self.linear_in(x), 2, axis=-1)
        return nn.silu(gate) * up

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_out(self.hidden(x))


def split_heads(x: mx.array, num_heads: int) -> mx.array:
    """(B, T, H*D) -> (B, H, T, D); a single step may come as (B, H*D)."""
    if x.ndim == 2 or x.shape[1] == 1:  # one step: the transpose is a pure reshape
        return x.reshape(x.shape[0], num_heads, 1, -1)
    b, t, _ = x.shape
    return x.reshape(b, t, num_heads, -1).transpose(0, 2, 1, 3)


def merge_heads(x: mx.array, ndim: int = 3) -> mx.array:
    """(B, H, T, D) -> (B, T, H*D), or (B, H*D) for one step with `ndim=2`.

    Single steps travel as 2-D (B, dim) arrays: every Linear is then a plain
    matmul, without the flatten/unflatten a 3-D input costs (two operations per
    Linear, ~700 per step).
    """
    b, h, t, d = x.shape
    if ndim == 2:
        return x.reshape(b, h * d)
    if t == 1:
        return x.reshape(b, 1, h * d)
    return x.transpose(0, 2, 1, 3).reshape(b, t, h * d)


@dataclass(frozen=True)
class CacheQuantization:
    """Keys and values stored as affine-quantized rows, groups along the head dimension.

    A step reads the whole KV window and the image K/V of every layer, ~2 GB
    in bf16 with a full window: on a Mac, where a step is bound by memory
    bandwidth, that is a quarter of its time. Stored at 8 bits they take
    (8 + 32 / group_size) / 16 of it and attention reads them through quantized
    products, never dequantizing the window.
    """

    bits: int = 8
    group_size: int = 64

    def pack(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """(packed, scales, biases) of `x` (..., head_dim)."""
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    def describe(self) -> str:
        return f"{self.bits}-bit/g{self.group_size}"


# A stored key or value block: a float array, or (packed, scales, biases).
Stored = "mx.array | tuple[mx.array, mx.array, mx.array]"


def flat_arrays(stored: list) -> list[mx.array]:
    """The arrays behind stored blocks, quantized or not."""
    return [a for block in stored for a in (block if isinstance(block, tuple) else (block,))]


class KVWindow:
    """The temporal transformer's keys and values: a fixed window that never grows.

    Slot `t % size` holds step t. Keys carry their RoPE rotation already and a
    single query attends to the whole window, so the order of the slots does not
    matter; slots not yet written are masked out. Shapes never change, so a
    compiled step is traced once, and memory is the same at step 10 and 10^6.
    With `quantization` each layer's keys and values are (packed, scales, biases).
    """

    def __init__(
        self,
        num_layers: int,
        size: int,
        num_heads: int,
        head_dim: int,
        dtype: mx.Dtype,
        quantization: CacheQuantization | None = None,
    ):
        self.size = size
        self.quantization = quantization
        shape = (1, num_heads, size, head_dim)

        def empty():
            zeros = mx.zeros(shape, dtype)
            return zeros if quantization is None else quantization.pack(zeros)

        self.keys = [empty() for _ in range(num_layers)]
        self.values = [empty() for _ in range(num_layers)]

    @property
    def state(self) -> list[mx.array]:
        return flat_arrays(self.keys + self.values)


def visible_slots(offset: int, size: int, smallest: int = 256) -> int:
    """How much of a window of `size` slots a step must read: all of it once full,
    else the written prefix rounded up to a power of two, so that a compiled step
    sees only a handful of shapes while the window fills (log2(size / smallest) + 1)."""
    if window_full(offset, size):
        return size
    bucket = smallest
    while bucket < offset + 1:
        bucket *= 2
    return min(bucket, size)


def window_full(offset: int, size: int) -> bool:
    """Whether every slot of the window holds a key at step `offset`."""
    return offset + 1 >= size


def write_window(
    window: Stored, update: mx.array, slot: mx.array, visible: int, quantization: CacheQuantization | None = None
) -> tuple[Stored, Stored]:
    """Write one step's (1, H, 1, D) entry at `slot` (shape (1,)); returns the
    whole window and its first `visible` slots (quantized first if the window is)."""
    if quantization is None:
        window = mx.slice_update(window, update, slot, axes=(2,))
        return window, window[:, :, :visible]
    window = tuple(mx.slice_update(w, u, slot, axes=(2,)) for w, u in zip(window, quantization.pack(update)))
    return window, tuple(w[:, :, :visible] for w in window)


def attention(
    q: mx.array,
    keys: Stored,
    values: Stored,
    scale: float,
    mask: mx.array | None = None,
    quantization: CacheQuantization | None = None,
) -> mx.array:
    """softmax(q k^T * scale, masked) v over float or quantized keys and values.

    Quantized ones are read through quantized products (`mx.quantized_matmul`
    with the groups along head_dim: the keys' reduction axis, the values'
    output axis); the scores and the softmax stay in float32 as in the fused kernel.
    """
    if quantization is None:
        return mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask)
    q_args = {"group_size": quantization.group_size, "bits": quantization.bits}
    scores = mx.quantized_matmul(q * scale, *keys, transpose=True, **q_args).astype(mx.float32)
    if mask is not None:
        scores = mx.where(mask, scores, -mx.inf)
    weights = mx.softmax(scores, axis=-1).astype(q.dtype)
    return mx.quantized_matmul(weights, *values, transpose=False, **q_args)
