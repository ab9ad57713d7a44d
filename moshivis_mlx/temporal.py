"""The temporal transformer: one position per 80 ms frame, with the image
reaching every layer through one shared, gated cross-attention."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig
from .layers import (
    FusedQKVAttention,
    GatedFFN,
    InterleavedRoPE,
    KVWindow,
    Linear,
    RMSNorm,
    add_linear,
    attend,
    fused_attention,
    merge_heads,
    split_heads,
    visible_slots,
    window_full,
    write_window,
)

# Kyutai's servers shade each word by the mean cross-attention gate of the last
# 10 temporal layers (kyuteye `Transformer.forward`): where the image speaks most.
GATE_MEAN_LAYERS = 10


@dataclass
class StepPosition:
    """What every layer of one step shares, computed once per step."""

    slot: mx.array  # (1,) window slot of this step
    valid: mx.array | None  # (visible,) bool: slots that hold a key; None once all do
    cos: mx.array  # RoPE tables of this step for the fused q, k, v row (3 * dim,)
    sin: mx.array
    visible: int  # window slots read (see `visible_slots`)


class SelfAttention(FusedQKVAttention):
    """Causal attention with fused QKV and interleaved RoPE on absolute steps."""

    def __init__(self, dim: int, num_heads: int, rope: InterleavedRoPE):
        super().__init__(dim, num_heads)
        self._rope = rope  # shared by all layers

    def __call__(
        self, x: mx.array, residual: mx.array, keys: mx.array, values: mx.array, at: StepPosition
    ) -> tuple[mx.array, mx.array, mx.array]:
        """One step: `x` (1, dim) normed, `residual` the layer input; returns
        (residual + attention, keys, values).

        q, k and v are rotated together as rows of one (3 * heads, head_dim)
        array (the tables leave v unchanged and scale q), then split once.
        """
        heads, head_dim = self.num_heads, self.head_dim
        rotated = self._rope(self.in_proj(x), at.cos, at.sin).reshape(1, 3 * heads, 1, head_dim)
        q, k, v = mx.split(rotated, 3, axis=1)
        keys, k_seen = write_window(keys, k, at.slot, at.visible)
        values, v_seen = write_window(values, v, at.slot, at.visible)
        y = attend(q, k_seen, v_seen, 1.0, at.valid)  # q carries the scale
        return add_linear(residual, self.out_proj, merge_heads(y, x.ndim)), keys, values

    def forward_sequence(self, x: mx.array, mask: mx.array) -> mx.array:
        """Whole-sequence forward from step 0 (for tests and prefill)."""
        q, k, v = (split_heads(t, self.num_heads) for t in mx.split(self.in_proj(x), 3, axis=-1))
        cos, sin = self._rope.tables(mx.arange(x.shape[1]))
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        y = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.out_proj(merge_heads(y, x.ndim))


@dataclass
class ImageKV:
    """Cross-attention keys and values of one image, shared by every layer and step."""

    keys: mx.array  # (1, H, N, head_dim)
    values: mx.array  # (1, H, N, head_dim)

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[2]


class SharedCrossAttention(nn.Module):
    """The single cross-attention of MoshiVis; each layer only owns a gate and a norm."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q_proj = Linear(dim, dim, bias=False)
        self.kv_proj = Linear(dim, 2 * dim, bias=False)
        self.out_proj = Linear(dim, dim, bias=False)

    def image_kv(self, embeddings: mx.array) -> ImageKV:
        """Project image embeddings (N, dim) once; the result serves every layer.

        Stored contiguous in the (1, H, N, head_dim) layout attention reads: a
        strided view would be re-gathered by each of the 32 layers at every step
        (5x slower cross-attention on the CPU).
        """
        k, v = mx.split(self.kv_proj(embeddings[None]), 2, axis=-1)
        return ImageKV(
            mx.contiguous(split_heads(k, self.num_heads)), mx.contiguous(split_heads(v, self.num_heads))
        )

    def compute_dtype(self, default: mx.Dtype) -> mx.Dtype:
        """The dtype of the shared weights when they are not quantized, else `default`:
        the image K/V are kept in it (see `MoshiVis.float32_on_cpu_parts`)."""
        weight = self.out_proj.weight
        return weight.dtype if mx.issubdtype(weight.dtype, mx.floating) else default

    def query_gain(self) -> float:
        """What the norm before `q_proj` multiplies by, so that q arrives scaled:
        the attention scale where attention is written out (see `fused_attention`)."""
        return 1.0 if fused_attention() else self.scale

    def __call__(self, x: mx.array, image: ImageKV) -> mx.array:
        """`x` normed with `query_gain()`: (B, T, dim), or one step (B, dim)."""
        q = split_heads(self.q_proj(x), self.num_heads)
        y = attend(q, image.keys, image.values, self.scale if self.query_gain() == 1.0 else 1.0)
        return self.out_proj(merge_heads(y, x.ndim)).astype(x.dtype)


class CrossAttentionGate(nn.Module):
    """`sigmoid(W2 relu(W1 y) - 4)`: starts almost closed so the image is added gently."""

    BIAS = -4.0

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear_in = Linear(dim, hidden, bias=False)
        self.linear_out = Linear(hidden, dim, bias=False)

    def __call__(self, y: mx.array) -> mx.array:
        return mx.sigmoid(self.linear_out(nn.relu(self.linear_in(y))) + self.BIAS)


class TemporalLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: InterleavedRoPE):
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = SelfAttention(cfg.dim, cfg.num_heads, rope)
        self.norm_cross = RMSNorm(cfg.dim, cfg.norm_eps)
        self.cross_gate = CrossAttentionGate(cfg.dim, cfg.gate_hidden)
        self.norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.gating = GatedFFN(cfg.dim, cfg.ffn_hidden)

    def gated_cross_attention(
        self, x: mx.array, xa: SharedCrossAttention, image: ImageKV
    ) -> tuple[mx.array, mx.array]:
        """(what the image adds to `x`, the gate's values (..., dim))."""
        y = xa(self.norm_cross(x, xa.query_gain()), image)
        gate = self.cross_gate(y)
        return (gate * y).astype(x.dtype), gate  # the gate may compute in float32

    def cross_attend(self, x: mx.array, xa: SharedCrossAttention, image: ImageKV) -> mx.array:
        return x + self.gated_cross_attention(x, xa, image)[0]

    def __call__(
        self,
        x: mx.array,
        keys: mx.array,
        values: mx.array,
        at: StepPosition,
        xa: SharedCrossAttention,
        image: ImageKV | None,
    ) -> tuple[mx.array, mx.array, mx.array, mx.array | None]:
        """Returns (output, keys, values, the cross-attention gate or None without an image)."""
        x, keys, values = self.self_attn(self.norm1(x), x, keys, values, at)
        gate = None
        if image is not None:
            update, gate = self.gated_cross_attention(x, xa, image)
            x = x + update
        return self.gating.residual(x, self.norm2(x)), keys, values, gate


class TemporalTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self._rope = InterleavedRoPE(cfg.head_dim, cfg.rope_max_period)
        self.layers = [TemporalLayer(cfg, self._rope) for _ in range(cfg.num_layers)]
        # Stored once; every layer borrows it.
        self.cross_attention = SharedCrossAttention(cfg.dim, cfg.num_heads)

    def position(self, offset: mx.array, visible: int, full: bool = False) -> StepPosition:
        """Step `offset`'s slot, valid-slot mask and rotation, for all layers at once.

        `full`: every slot holds a key (offset >= context - 1), so no mask.
        """
        cfg = self.cfg
        cos, sin = self._rope.qkv_tables(offset, cfg.num_heads, cfg.head_dim**-0.5)
        slot = (offset % cfg.context).reshape(1)
        valid = None if full else mx.arange(visible) <= offset
        return StepPosition(slot, valid, cos, sin, visible)

    def make_cache(self, dtype: mx.Dtype) -> KVWindow:
        cfg = self.cfg
        return KVWindow(cfg.num_layers, cfg.context, cfg.num_heads, cfg.head_dim, dtype)

    def __call__(
        self,
        x: mx.array,
        keys: list[mx.array],
        values: list[mx.array],
        offset: mx.array,
        visible: int,
        image: ImageKV | None,
        full: bool = False,
    ) -> tuple[mx.array, list[mx.array], list[mx.array], mx.array | None]:
        """One step (1, dim); returns the output, the updated per-layer keys/values
        and the step's gate: the mean cross-attention gate of the last
        `GATE_MEAN_LAYERS` layers, a float32 scalar (None without an image).
        `full`: the window is full (see `position`)."""
        at = self.position(offset, visible, full)
        new_keys, new_values, gates = [], [], []
        for layer, k, v in zip(self.layers, keys, values):
            x, k, v, gate = layer(x, k, v, at, self.cross_attention, image)
            new_keys.append(k)
            new_values.append(v)
            gates.append(gate)
        last = gates[-GATE_MEAN_LAYERS:]
        # Two operations for all layers (one concatenation, one mean), not two per layer.
        mean_gate = None if image is None else mx.mean(mx.concatenate(last, axis=-1).astype(mx.float32))
        return x, new_keys, new_values, mean_gate

    def step(self, x: mx.array, cache: KVWindow, offset: int, image: ImageKV | None) -> mx.array:
        """Uncompiled convenience: one step that updates `cache` in place."""
        visible = visible_slots(offset, cache.size)
        x, cache.keys, cache.values, _ = self(
            x, cache.keys, cache.values, mx.array(offset), visible, image, window_full(offset, cache.size)
        )
        return x

    def forward_sequence(
        self, x: mx.array, image: ImageKV | None = None, xa_start: int = 0, context: int | None = None
    ) -> mx.array:
        """Causal forward of a whole sequence (B, T, dim) starting at step 0.

        The sliding window (`context`, the configured one by default) is applied
        through the mask, so this is the reference the streaming path must match.
        """
        t = x.shape[1]
        steps = mx.arange(t)
        delta = steps[:, None] - steps[None, :]
        mask = (delta >= 0) & (delta < (context or self.cfg.context))
        xa_active = (steps >= xa_start)[None, :, None]
        for layer in self.layers:
            x = x + layer.self_attn.forward_sequence(layer.norm1(x), mask)
            if image is not None:
                x = mx.where(xa_active, layer.cross_attend(x, self.cross_attention, image), x)
            x = x + layer.gating(layer.norm2(x))
        return x
