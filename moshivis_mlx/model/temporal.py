"""The temporal transformer: one position per 80 ms frame, with the image
reaching every layer through one shared, gated cross-attention."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig
from .layers import (
    CacheQuantization,
    FusedQKVAttention,
    GatedFFN,
    KVWindow,
    RMSNorm,
    attention,
    flat_arrays,
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
    offset: mx.array  # () the step's absolute index: its RoPE position
    visible: int  # window slots read (see `visible_slots`)
    kv: CacheQuantization | None = None  # how the window stores keys and values


class SelfAttention(FusedQKVAttention):
    """Causal attention with fused QKV and interleaved RoPE on absolute steps."""

    def __init__(self, dim: int, num_heads: int, rope_max_period: float):
        super().__init__(dim, num_heads)
        self.rope_max_period = rope_max_period

    def rope(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        """Rotate (B, H, T, head_dim) by positions offset..offset+T-1 (pairs 2i, 2i+1)."""
        return mx.fast.rope(x, self.head_dim, traditional=True, base=self.rope_max_period, scale=1.0, offset=offset)

    def __call__(
        self, x: mx.array, keys: mx.array, values: mx.array, at: StepPosition
    ) -> tuple[mx.array, mx.array, mx.array]:
        """One step: `x` (1, dim) normed; returns (attention output, keys, values)."""
        q, k, v = (split_heads(t, self.num_heads) for t in mx.split(self.in_proj(x), 3, axis=-1))  # (1, H, 1, D)
        q, k = self.rope(q, at.offset), self.rope(k, at.offset)
        keys, k_seen = write_window(keys, k, at.slot, at.visible, at.kv)
        values, v_seen = write_window(values, v, at.slot, at.visible, at.kv)
        y = attention(q, k_seen, v_seen, self.scale, at.valid, at.kv)
        return self.out_proj(merge_heads(y, x.ndim)), keys, values

    def forward_sequence(self, x: mx.array, mask: mx.array) -> mx.array:
        """Whole-sequence forward from step 0 (for tests and prefill)."""
        q, k, v = (split_heads(t, self.num_heads) for t in mx.split(self.in_proj(x), 3, axis=-1))
        y = mx.fast.scaled_dot_product_attention(self.rope(q), self.rope(k), v, scale=self.scale, mask=mask)
        return self.out_proj(merge_heads(y, x.ndim))


@dataclass
class ImageKV:
    """Cross-attention keys and values of one image, shared by every layer and step."""

    keys: "mx.array | tuple[mx.array, ...]"  # (1, H, N, head_dim), or (packed, scales, biases)
    values: "mx.array | tuple[mx.array, ...]"
    quantization: CacheQuantization | None = None

    @property
    def num_tokens(self) -> int:
        return (self.keys[0] if self.quantization else self.keys).shape[2]

    @property
    def arrays(self) -> list[mx.array]:
        return flat_arrays([self.keys, self.values])

    def quantized(self, quantization: CacheQuantization | None) -> "ImageKV":
        """These K/V stored with `quantization` (None: as they are)."""
        if quantization is None or self.quantization is not None:
            return self
        return ImageKV(quantization.pack(self.keys), quantization.pack(self.values), quantization)


class SharedCrossAttention(nn.Module):
    """The single cross-attention of MoshiVis; each layer only owns a gate and a norm."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.kv_proj = nn.Linear(dim, 2 * dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)

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

    def __call__(self, x: mx.array, image: ImageKV) -> mx.array:
        """`x` normed: (B, T, dim), or one step (B, dim)."""
        q = split_heads(self.q_proj(x), self.num_heads)
        y = attention(q, image.keys, image.values, self.scale, quantization=image.quantization)
        return self.out_proj(merge_heads(y, x.ndim)).astype(x.dtype)


class CrossAttentionGate(nn.Module):
    """`sigmoid(W2 relu(W1 y) - 4)`: starts almost closed so the image is added gently."""

    BIAS = -4.0

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear_in = nn.Linear(dim, hidden, bias=False)
        self.linear_out = nn.Linear(hidden, dim, bias=False)

    def __call__(self, y: mx.array) -> mx.array:
        return mx.sigmoid(self.linear_out(nn.relu(self.linear_in(y))) + self.BIAS)


class TemporalLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = SelfAttention(cfg.dim, cfg.num_heads, cfg.rope_max_period)
        self.norm_cross = RMSNorm(cfg.dim, cfg.norm_eps)
        self.cross_gate = CrossAttentionGate(cfg.dim, cfg.gate_hidden)
        self.norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.gating = GatedFFN(cfg.dim, cfg.ffn_hidden)

    def gated_cross_attention(
        self, x: mx.array, xa: SharedCrossAttention, image: ImageKV
    ) -> tuple[mx.array, mx.array]:
        """(what the image adds to `x`, the gate's values (..., dim))."""
        y = xa(self.norm_cross(x), image)
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
        y, keys, values = self.self_attn(self.norm1(x), keys, values, at)
        x = x + y
        gate = None
        if image is not None:
            update, gate = self.gated_cross_attention(x, xa, image)
            x = x + update
        return x + self.gating(self.norm2(x)), keys, values, gate


class TemporalTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = [TemporalLayer(cfg) for _ in range(cfg.num_layers)]
        # Stored once; every layer borrows it.
        self.cross_attention = SharedCrossAttention(cfg.dim, cfg.num_heads)
        # How windows made from now on, and image K/V, are stored (see `MoshiVis.quantize_caches`).
        self.kv_quantization: CacheQuantization | None = None
        self.image_kv_quantization: CacheQuantization | None = None

    def position(
        self, offset: mx.array, visible: int, full: bool = False, kv: CacheQuantization | None = None
    ) -> StepPosition:
        """Step `offset`'s slot and valid-slot mask, for all layers at once.

        `full`: every slot holds a key (offset >= context - 1), so no mask.
        `kv`: how the window stores keys and values.
        """
        slot = (offset % self.cfg.context).reshape(1)
        valid = None if full else mx.arange(visible) <= offset
        return StepPosition(slot, valid, offset, visible, kv)

    def make_cache(self, dtype: mx.Dtype) -> KVWindow:
        cfg = self.cfg
        return KVWindow(cfg.num_layers, cfg.context, cfg.num_heads, cfg.head_dim, dtype, self.kv_quantization)

    def __call__(
        self,
        x: mx.array,
        keys: list[mx.array],
        values: list[mx.array],
        offset: mx.array,
        visible: int,
        image: ImageKV | None,
        full: bool = False,
        kv: CacheQuantization | None = None,
    ) -> tuple[mx.array, list[mx.array], list[mx.array], mx.array | None]:
        """One step (1, dim); returns the output, the updated per-layer keys/values
        and the step's gate: the mean cross-attention gate of the last
        `GATE_MEAN_LAYERS` layers, a float32 scalar (None without an image).
        `full`: the window is full; `kv`: how it stores keys and values (see `position`)."""
        at = self.position(offset, visible, full, kv)
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
            x, cache.keys, cache.values, mx.array(offset), visible, image, window_full(offset, cache.size),
            cache.quantization,
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
