"""The CPU counterparts of the building blocks in `model.layers`, and the tricks they use.

Nothing here changes what is computed, only how MLX's CPU backend gets there
faster: weights kept transposed and split into row blocks on several CPU
streams (`cores`, `blas`), attention written out (split by heads or blocks of
keys), a scale folded into a kernel that runs anyway (a norm, the RoPE tables),
residuals added inside the products. `platform_path` applies them after loading,
on a CPU only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TypeVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..model.layers import CacheQuantization, GatedFFN, RMSNorm, Stored, attention, flat_arrays
from .blas import key_blocks, one_row_block_rows
from .cores import cpu_streams, on_streams, split_rows


M = TypeVar("M", bound=nn.Module)


def adopt(cls: type[M], module: nn.Module) -> M:
    """`module` as an instance of `cls` (its CPU counterpart, a subclass adding no
    parameters): the same parameters, children and attributes, nothing copied."""
    counterpart = cls.__new__(cls)
    dict.update(counterpart, module)  # parameters and child modules
    counterpart.__dict__.update(module.__dict__)  # plain attributes (sizes, scales, ...)
    return counterpart


def scaled_norm(norm: nn.Module, x: mx.array, gain: float) -> mx.array:
    """`gain * norm(x)` with the gain inside the norm's kernel: what a CPU
    counterpart uses to fold an attention scale into the norm before it."""
    if isinstance(norm, RMSNorm):
        weight = norm.weight.astype(mx.float32)
        return mx.fast.rms_norm(x.astype(mx.float32), weight * gain, norm.eps).astype(x.dtype)
    h = x.astype(mx.float32) if norm.in_float32 else x
    var = mx.var(h, axis=-1, keepdims=True, ddof=1)
    return (h * ((norm.weight.astype(h.dtype) * gain) * mx.rsqrt(var + norm.eps))).astype(x.dtype)


def ffn_residual(ffn: GatedFFN, residual: mx.array, x: mx.array) -> mx.array:
    """`residual + ffn(x)`, with the addition inside the last product."""
    return add_linear(residual, ffn.linear_out, ffn.hidden(x))


@dataclass(frozen=True)
class RowBlock:
    """Rows [start, stop) of a weight, transposed (a view), multiplied on `stream`."""

    start: int
    stop: int
    weight_t: mx.array
    stream: mx.ThreadLocalStream | None  # None: the default stream


@dataclass(frozen=True)
class KeptViews:
    """What a `Linear` keeps of its weight: views, no copies."""

    weight: mx.array  # the weight they were made from (to notice a replaced one)
    transposed: mx.array  # weight.T
    one_row_blocks: list[RowBlock] | None  # one-row float32 products (OpenBLAS's small kernel)
    core_blocks: list[RowBlock] | None  # every product MLX computes itself (bf16, float16)


def row_blocks(weight: mx.array, bounds: list[tuple[int, int]]) -> list[RowBlock]:
    """Blocks of `weight`'s rows, each on the next CPU stream in turn (see `cores`)."""
    return [RowBlock(a, b, weight[a:b].T, stream) for (a, b), stream in on_streams(bounds)]


class CpuLinear(nn.Linear):
    """`nn.Linear` that can keep its transposed weight between calls (the CPU counterpart).

    `x @ W.T` puts a Transpose into the graph at every call: ~400 per step.
    `keep_transposed_weights` stores the transposed weight as a view (no copy:
    it shares the weight's memory). It also keeps views of blocks of
    weight rows, each multiplied on its own CPU stream, so that a large
    product runs on every core (`cores`): for bf16 and float16 weights, which
    MLX multiplies itself on one thread, and where OpenBLAS multiplies one row
    by a large float32 weight slowly (`blas.one_row_block_rows`). Each block
    computes its output columns exactly as the whole product does. A weight
    replaced afterwards (`update`, `set_dtype`) is noticed and transposed on
    the fly again: a kept view is never stale.
    """

    def keep_transposed(self) -> list[mx.array]:
        """Make the views (still to be evaluated: see `keep_transposed_weights`)."""
        weight = self["weight"]
        out_features, in_features = weight.shape
        one_row = core = None
        if weight.dtype == mx.float32:
            rows = one_row_block_rows(in_features, out_features)
            if rows:
                one_row = row_blocks(weight, [(i, min(i + rows, out_features)) for i in range(0, out_features, rows)])
        else:  # a single stream (MOSHIVIS_MLX_CPU_STREAMS=1) gives no bounds
            bounds = split_rows(out_features, in_features, len(cpu_streams()))
            core = row_blocks(weight, bounds) if bounds else None
        kept = KeptViews(weight, weight.T, one_row, core)
        object.__setattr__(self, "_kept", kept)  # a plain attribute: not a parameter
        return [kept.transposed] + [block.weight_t for block in (one_row or core or [])]

    def _kept_views(self) -> "KeptViews | None":
        """The kept views, unless the weight was replaced since they were made."""
        kept = self.__dict__.get("_kept")
        return kept if kept is not None and kept.weight is self["weight"] else None

    def weight_t(self) -> mx.array:
        kept = self._kept_views()
        return kept.transposed if kept is not None else self["weight"].T

    def _blocks(self, x: mx.array) -> list[RowBlock] | None:
        kept = self._kept_views()
        if kept is None:
            return None
        if kept.core_blocks is not None:
            return kept.core_blocks
        return kept.one_row_blocks if x.ndim == 2 and x.shape[0] == 1 else None

    @staticmethod
    def _by_blocks(x: mx.array, blocks: list[RowBlock], addend: mx.array | None = None, alpha: float = 1.0):
        """`addend + alpha * x @ W.T`, each block of output columns on its own stream."""
        if addend is None:
            parts = [mx.matmul(x, b.weight_t, stream=b.stream) for b in blocks]
        else:
            parts = [mx.addmm(addend[..., b.start : b.stop], x, b.weight_t, alpha=alpha, stream=b.stream) for b in blocks]
        return mx.concatenate(parts, axis=-1)

    def __call__(self, x: mx.array) -> mx.array:
        bias = self["bias"] if "bias" in self else None
        blocks = self._blocks(x)
        if blocks is not None:
            return self._by_blocks(x, blocks, bias)
        if bias is not None:
            return mx.addmm(bias, x, self.weight_t())
        return x @ self.weight_t()

    def add_to(self, residual: mx.array, x: mx.array, alpha: float = 1.0) -> mx.array:
        """`residual + alpha * self(x)`, with the addition inside the product(s)."""
        if "bias" in self:
            return residual + (alpha * self(x) if alpha != 1.0 else self(x))
        blocks = self._blocks(x)
        if blocks is not None:
            return self._by_blocks(x, blocks, residual, alpha)
        return mx.addmm(residual, x, self.weight_t(), alpha=alpha)

    def to_quantized(self, group_size: int | None = None, bits: int | None = None, mode: str = "affine", **kwargs):
        if kwargs.get("quantize_input"):
            return super().to_quantized(group_size, bits, mode, **kwargs)
        return CpuQuantizedLinear.from_linear(self, group_size, bits, mode=mode)


class CpuQuantizedLinear(nn.QuantizedLinear):
    """`nn.QuantizedLinear` whose product can be spread over the CPU's cores (the CPU counterpart).

    MLX's CPU quantized kernel runs on one thread; `keep_transposed_weights`
    makes a large layer keep views of blocks of its packed rows, scales and
    biases, each multiplied on its own CPU stream (see `cores`).
    """

    def keep_transposed(self) -> list[mx.array]:
        weight = self["weight"]
        out_features, in_features = weight.shape[0], weight.shape[1] * 32 // self.bits
        bounds = split_rows(out_features, in_features, len(cpu_streams()))
        blocks = on_streams([self._rows(a, b) for a, b in bounds]) if bounds else None
        object.__setattr__(self, "_kept", (weight, blocks))
        return [a for rows, _ in (blocks or []) for a in rows if a is not None]

    def _rows(self, start: int, stop: int) -> tuple[mx.array, mx.array, mx.array | None]:
        """Rows [start, stop) of the packed weight, its scales and biases (views)."""
        biases = self.get("biases")
        return self["weight"][start:stop], self["scales"][start:stop], None if biases is None else biases[start:stop]

    def __call__(self, x: mx.array) -> mx.array:
        kept = self.__dict__.get("_kept")
        if kept is None or kept[0] is not self["weight"] or kept[1] is None:
            return super().__call__(x)
        y = mx.concatenate(
            [
                mx.quantized_matmul(
                    x, w, scales=scales, biases=biases, transpose=True,
                    group_size=self.group_size, bits=self.bits, mode=self.mode, stream=stream,
                )  # fmt: skip
                for (w, scales, biases), stream in kept[1]
            ],
            axis=-1,
        )
        return y + self["bias"] if "bias" in self else y


def keep_transposed_weights(model: nn.Module) -> None:
    """Make every `Linear` of `model` keep its transposed views, evaluated once
    here, outside any step graph."""
    kinds = (CpuLinear, CpuQuantizedLinear)
    views = [view for m in model.modules() if isinstance(m, kinds) for view in m.keep_transposed()]
    mx.eval(views)
    mx.eval(views)  # evaluating them again detaches them from their Transpose nodes


def add_linear(residual: mx.array, layer: nn.Module, x: mx.array, alpha: float = 1.0) -> mx.array:
    """`residual + alpha * layer(x)`: one `addmm` for an unquantized Linear without
    bias instead of a product and an addition (a step has ~200 such residuals)."""
    if isinstance(layer, CpuLinear):
        return layer.add_to(residual, x, alpha)
    return residual + (alpha * layer(x) if alpha != 1.0 else layer(x))


def attend(
    q: mx.array,
    keys: Stored,
    values: Stored,
    scale: float,
    mask: mx.array | None = None,
    quantization: CacheQuantization | None = None,
) -> mx.array:
    """`softmax(scale * q keys^T) values` over the last two axes; `mask` (bool) keeps keys.

    What `mx.fast.scaled_dot_product_attention` computes. On the CPU MLX
    composes that call out of plain operations anyway, multiplying by the scale
    even when it is 1; written out here, a query already scaled (the CPU
    counterparts fold the scale into the RoPE tables or the norm before the
    projection) costs one operation less per attention. The heads of a large
    attention (the full-size window, the image) are split into groups, one per
    CPU stream (see `cores`): each head is computed as before. Quantized keys
    and values (`quantization`) are attended as `model.layers.attention` does, by
    the same groups of heads.
    """
    heads = q.shape[-3]
    size = sum(a.size for a in flat_arrays([keys]))
    groups = split_rows(heads, size // heads, len(cpu_streams()), multiple=1)
    if groups is None:
        return _attend_heads(q, keys, values, scale, mask, quantization, None)
    parts = [
        _attend_heads(q[..., a:b, :, :], _heads(keys, a, b), _heads(values, a, b), scale, mask, quantization, stream)
        for (a, b), stream in on_streams(groups)
    ]
    return mx.concatenate(parts, axis=-3)


def _heads(stored: Stored, start: int, stop: int) -> Stored:
    if isinstance(stored, tuple):
        return tuple(a[..., start:stop, :, :] for a in stored)
    return stored[..., start:stop, :, :]


def _attend_heads(q, keys, values, scale: float, mask, quantization, stream) -> mx.array:
    if quantization is None:
        return _written_out_attention(q, keys, values, scale, mask, stream)
    with mx.stream(stream if stream is not None else mx.default_stream(mx.cpu)):
        return attention(q, keys, values, scale, mask, quantization)


def _written_out_attention(q, keys, values, scale: float, mask, stream) -> mx.array:
    if scale != 1.0:
        q = mx.multiply(q, scale, stream=stream)
    scores = _scores(q, keys, stream)
    if mask is not None:
        scores = mx.where(mask, scores, -mx.inf, stream=stream)
    return mx.matmul(mx.softmax(scores, axis=-1, precise=True, stream=stream), values, stream=stream)


def _scores(q: mx.array, keys: mx.array, stream) -> mx.array:
    """`q keys^T`; a single float32 query over a long window in blocks of keys (`blas.key_blocks`)."""
    one_query = q.shape[-2] == 1 and keys.dtype == mx.float32
    blocks = key_blocks(keys.shape[-1], keys.shape[-2]) if one_query else 1
    if blocks == 1:
        return mx.matmul(q, keys.swapaxes(-1, -2), stream=stream)
    return scores_in_blocks(q, keys, blocks, stream)


def scores_in_blocks(q: mx.array, keys: mx.array, blocks: int, stream=None) -> mx.array:
    """`q keys^T` for one query (..., 1, D), as one batched product over `blocks`
    equal blocks of the keys (..., N, D): each block is a product of its own."""
    *batch, length, dim = keys.shape
    by_block = keys.reshape(*batch, blocks, length // blocks, dim)
    scores = mx.matmul(mx.expand_dims(q, -3), by_block.swapaxes(-1, -2), stream=stream)
    return scores.reshape(*batch, 1, length)


@functools.cache
def _pair_partners(length: int) -> mx.array:
    """Indices (1, length) taking each (x[2i], x[2i+1]) pair to (x[2i+1], x[2i])."""
    return mx.array(np.arange(length).reshape(-1, 2)[:, ::-1].reshape(1, length))


class RopeTables:
    """Rotary embedding of (x[2i], x[2i+1]) pairs (`mx.fast.rope`'s `traditional=True`) from tables.

    A pair (a, b) becomes (a cos - b sin, b cos + a sin): `x * cos + partner(x) * sin`
    where partner(x) swaps each pair (one gather, exact) and the sin table
    carries the sign (-sin, +sin). Every layer of a step rotates by the same
    angles, so the tables are computed once per step and a layer applies 2
    operations instead of ~10 for `mx.fast.rope` on a backend without a fused
    kernel. Computed in float32 like `mx.fast.rope`.
    """

    def __init__(self, head_dim: int, base: float):
        self.head_dim = head_dim
        exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
        self.inv_freq = mx.array((base ** -exponents).astype(np.float32))
        self._sin_sign = mx.array(np.tile([-1.0, 1.0], head_dim // 2).astype(np.float32))

    def tables(self, positions: mx.array) -> tuple[mx.array, mx.array]:
        """positions () or (T,) -> cos, signed sin of shape (head_dim,) or (T, head_dim), float32."""
        angles = positions.astype(mx.float32)[..., None] * self.inv_freq
        return mx.repeat(mx.cos(angles), 2, axis=-1), mx.repeat(mx.sin(angles), 2, axis=-1) * self._sin_sign

    def qkv_tables(self, position: mx.array, num_heads: int, q_scale: float) -> tuple[mx.array, mx.array]:
        """Flat tables (3 * num_heads * head_dim,) that rotate one step's fused
        q, k, v projection as it comes out of the product: the q part also takes
        the attention scale, the v part is kept as it is (cos 1, sin 0: exact)."""
        cos, sin = self.tables(position)
        gain = mx.array([q_scale] * num_heads + [1.0] * num_heads + [0.0] * num_heads)[:, None]
        keep = mx.array([0.0] * (2 * num_heads) + [1.0] * num_heads)[:, None]
        return (cos * gain + keep).reshape(-1), (sin * gain).reshape(-1)

    @staticmethod
    def rotate(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        """Rotate x (..., n) with tables broadcasting to it; n is any multiple of
        head_dim, as pairs never straddle two heads."""
        n = x.shape[-1]
        partners = _pair_partners(n)
        if x.ndim != 2 or x.shape[0] != 1:
            partners = mx.broadcast_to(partners.reshape((1,) * (x.ndim - 1) + (n,)), x.shape)
        swapped = mx.take_along_axis(x, partners, axis=-1)
        return (x.astype(mx.float32) * cos + swapped.astype(mx.float32) * sin).astype(x.dtype)
