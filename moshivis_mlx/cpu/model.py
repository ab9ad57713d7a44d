"""The CPU counterparts of the model's modules, and the one function that swaps them in.

Each counterpart subclasses a plain module, adds no parameter and computes the
same thing with fewer or faster operations on MLX's CPU backend (see
`cpu.layers`): the temporal queries take the attention scale from their RoPE
tables, the cross-attention and depformer queries from the norm before them,
residuals are added inside the products. `platform_path.apply_platform_path`
calls `to_cpu_counterparts` after loading, on a CPU only.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from ..model.depformer import Depformer, DepformerAttention
from ..model.layers import CacheQuantization, merge_heads, split_heads, write_window
from ..model.siglip import VisionQuantizedLinear
from ..model.temporal import (
    ImageKV,
    SelfAttention,
    SharedCrossAttention,
    StepPosition,
    TemporalLayer,
    TemporalTransformer,
)
from .layers import (
    CpuLinear,
    CpuQuantizedLinear,
    RopeTables,
    add_linear,
    adopt,
    attend,
    ffn_residual,
    scaled_norm,
)


@dataclass
class TabledStepPosition(StepPosition):
    """A step's position with its RoPE tables for the fused q, k, v row (3 * dim,)."""

    cos: mx.array | None = None
    sin: mx.array | None = None


class CpuSelfAttention(SelfAttention):
    def __call__(
        self, x: mx.array, residual: mx.array, keys: mx.array, values: mx.array, at: TabledStepPosition
    ) -> tuple[mx.array, mx.array, mx.array]:
        """One step: `x` (1, dim) normed, `residual` the layer input; returns
        (residual + attention, keys, values).

        q, k and v are rotated together as rows of one (3 * heads, head_dim)
        array (the tables leave v unchanged and scale q), then split once.
        """
        rotated = RopeTables.rotate(self.in_proj(x), at.cos, at.sin).reshape(1, 3 * self.num_heads, 1, self.head_dim)
        q, k, v = mx.split(rotated, 3, axis=1)
        keys, k_seen = write_window(keys, k, at.slot, at.visible, at.kv)
        values, v_seen = write_window(values, v, at.slot, at.visible, at.kv)
        y = attend(q, k_seen, v_seen, 1.0, at.valid, at.kv)  # q carries the scale
        return add_linear(residual, self.out_proj, merge_heads(y, x.ndim)), keys, values


class CpuSharedCrossAttention(SharedCrossAttention):
    def __call__(self, x: mx.array, image: ImageKV) -> mx.array:
        """`x` normed and multiplied by `self.scale` (see `CpuTemporalLayer`)."""
        q = split_heads(self.q_proj(x), self.num_heads)
        y = attend(q, image.keys, image.values, 1.0, quantization=image.quantization)
        return self.out_proj(merge_heads(y, x.ndim)).astype(x.dtype)


class CpuTemporalLayer(TemporalLayer):
    def gated_cross_attention(
        self, x: mx.array, xa: SharedCrossAttention, image: ImageKV
    ) -> tuple[mx.array, mx.array]:
        y = xa(scaled_norm(self.norm_cross, x, xa.scale), image)  # q arrives scaled
        gate = self.cross_gate(y)
        return (gate * y).astype(x.dtype), gate

    def __call__(
        self,
        x: mx.array,
        keys: mx.array,
        values: mx.array,
        at: TabledStepPosition,
        xa: SharedCrossAttention,
        image: ImageKV | None,
    ) -> tuple[mx.array, mx.array, mx.array, mx.array | None]:
        x, keys, values = self.self_attn(self.norm1(x), x, keys, values, at)
        gate = None
        if image is not None:
            update, gate = self.gated_cross_attention(x, xa, image)
            x = x + update
        return ffn_residual(self.gating, x, self.norm2(x)), keys, values, gate


class CpuTemporalTransformer(TemporalTransformer):
    """Computes each step's RoPE tables once for all layers (`RopeTables`)."""

    rope_tables: RopeTables

    def position(
        self, offset: mx.array, visible: int, full: bool = False, kv: CacheQuantization | None = None
    ) -> TabledStepPosition:
        cfg = self.cfg
        at = super().position(offset, visible, full, kv)
        cos, sin = self.rope_tables.qkv_tables(offset, cfg.num_heads, cfg.head_dim**-0.5)
        return TabledStepPosition(at.slot, at.valid, at.offset, at.visible, at.kv, cos, sin)


class CpuDepformerAttention(DepformerAttention):
    def input_gain(self) -> float:
        """What the norm before `in_proj` multiplies by: sqrt(scale). q and k then
        carry the attention scale between them, v carries sqrt(scale) too, and
        the output product's `alpha` takes it back out, so no operation of its
        own applies the scale."""
        return self.scale**0.5

    def __call__(self, x: mx.array, residual: mx.array, past: list[tuple[mx.array, mx.array]]) -> mx.array:
        """`residual` + attention of one step `x` (1, dim), normed with
        `input_gain()`, over this frame's earlier steps; appends this step's
        (k, v) to `past`."""
        heads, gain = self.num_heads, self.input_gain()
        q, k, v = mx.split(self.in_proj(x).reshape(1, 3 * heads, 1, self.head_dim), 3, axis=1)
        past.append((k, v))
        if len(past) == 1:  # one key: its softmax weight is exactly 1, so attention returns v
            return add_linear(residual, self.out_proj, merge_heads(v, 2), alpha=1 / gain)
        keys = mx.concatenate([p[0] for p in past], axis=2)
        values = mx.concatenate([p[1] for p in past], axis=2)
        y = attend(q, keys, values, 1.0)  # q and k carry the scale
        return add_linear(residual, self.out_proj, merge_heads(y, 2), alpha=1 / gain)


class CpuDepformer(Depformer):
    """`Depformer` with the depformer attention's CPU arithmetic (gain-scaled norm, residual inside the product)."""

    def _layer(self, norms, weights, x: mx.array, past: list[tuple[mx.array, mx.array]]) -> mx.array:
        x = weights.self_attn(scaled_norm(norms.norm1, x, weights.self_attn.input_gain()), x, past)
        return ffn_residual(weights.gating, x, norms.norm2(x))


class CpuVisionQuantizedLinear(VisionQuantizedLinear):
    """The tower multiplies 1024 rows at once. MLX's CPU quantized matmul does
    not use BLAS and runs such products ~40x slower than dequantizing the
    weight (a transient float copy of one matrix) and calling BLAS."""

    def __call__(self, x: mx.array) -> mx.array:
        weight = mx.dequantize(
            self["weight"], self["scales"], self.get("biases"), self.group_size, self.bits, mode=self.mode
        )
        y = x @ weight[:, : self.input_dims].astype(x.dtype).T
        return y + self["bias"].astype(x.dtype) if "bias" in self else y


# Plain module type -> its CPU counterpart. Exact types: a counterpart is never swapped again.
LANGUAGE_MODEL_COUNTERPARTS: dict[type, type] = {
    nn.Linear: CpuLinear,
    nn.QuantizedLinear: CpuQuantizedLinear,
    SelfAttention: CpuSelfAttention,
    SharedCrossAttention: CpuSharedCrossAttention,
    TemporalLayer: CpuTemporalLayer,
    TemporalTransformer: CpuTemporalTransformer,
    DepformerAttention: CpuDepformerAttention,
    Depformer: CpuDepformer,
}
VISION_COUNTERPARTS: dict[type, type] = {VisionQuantizedLinear: CpuVisionQuantizedLinear}


def to_cpu_counterparts(module: nn.Module, counterparts: dict[type, type] = LANGUAGE_MODEL_COUNTERPARTS) -> nn.Module:
    """`module` with every descendant (and itself) of a type in `counterparts`
    swapped for its CPU counterpart, children first; parameters are shared."""
    children = tree_map(lambda child: to_cpu_counterparts(child, counterparts), module.children(), is_leaf=nn.Module.is_module)
    module.update_modules(children)
    counterpart = counterparts.get(type(module))
    if counterpart is None:
        return module
    swapped = adopt(counterpart, module)
    if isinstance(swapped, CpuTemporalTransformer):
        swapped.rope_tables = RopeTables(swapped.cfg.head_dim, swapped.cfg.rope_max_period)
    return swapped
