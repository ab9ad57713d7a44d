"""The depth transformer: within one frame, generates the 8 audio codebooks
one after the other, each step with its own weights."""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig
from .layers import FusedQKVAttention, GatedFFN, embed_one, make_norm, merge_heads

# (logits (1, audio_card), codebook index k) -> token (1,)
Sampler = Callable[[mx.array, int], mx.array]


class DepformerAttention(FusedQKVAttention):
    """Attention over the current frame's earlier depformer steps (no positions)."""

    def __call__(self, x: mx.array, past: list[tuple[mx.array, mx.array]]) -> mx.array:
        """Attention of one step `x` (1, dim), normed, over this frame's earlier
        steps; appends this step's (k, v) to `past`."""
        q, k, v = mx.split(self.in_proj(x).reshape(1, 3 * self.num_heads, 1, self.head_dim), 3, axis=1)
        past.append((k, v))
        keys = mx.concatenate([p[0] for p in past], axis=2)
        values = mx.concatenate([p[1] for p in past], axis=2)
        y = mx.fast.scaled_dot_product_attention(q, keys, values, scale=self.scale)
        return self.out_proj(merge_heads(y, 2))


class DepformerStepLayer(nn.Module):
    """The weights one layer uses at one depformer step."""

    def __init__(self, dim: int, num_heads: int, ffn_hidden: int):
        super().__init__()
        self.self_attn = DepformerAttention(dim, num_heads)
        self.gating = GatedFFN(dim, ffn_hidden)


class DepformerStep(nn.Module):
    """Everything that belongs to one generated codebook k."""

    def __init__(self, cfg: ModelConfig, token_vocab: int):
        super().__init__()
        dep = cfg.depformer
        self.emb = nn.Embedding(token_vocab, dep.dim)
        self.layers = [DepformerStepLayer(dep.dim, dep.num_heads, dep.ffn_hidden) for _ in range(dep.num_layers)]
        self.linear_out = nn.Linear(dep.dim, cfg.audio_card, bias=False)


class DepformerNorms(nn.Module):
    """The norms of one layer, shared by all depformer steps."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dep = cfg.depformer
        self.norm1 = make_norm(cfg.depformer_norm, dep.dim, dep.norm_eps)
        self.norm2 = make_norm(cfg.depformer_norm, dep.dim, dep.norm_eps)


class Depformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dep = cfg.depformer
        self.cfg = cfg
        # The 8 per-step input projections of the temporal output, fused into one matmul.
        self.input_proj = nn.Linear(cfg.dim, dep.num_steps * dep.dim, bias=False)
        self.layers = [DepformerNorms(cfg) for _ in range(dep.num_layers)]
        self.steps = [
            DepformerStep(cfg, (cfg.text_card if k == 0 else cfg.audio_card) + 1) for k in range(dep.num_steps)
        ]

    def __call__(
        self, temporal_out: mx.array, text_token: mx.array, sampler: Sampler
    ) -> tuple[mx.array, mx.array]:
        """One frame: `temporal_out` (1, dim) and the text token (1,) just sampled.

        Returns the sampled audio tokens (num_steps,) and their logits
        (num_steps, audio_card). Every step is conditioned on the token sampled
        by the step before it; attention only sees the current frame, so the
        per-layer history starts empty each call.
        """
        inputs = mx.split(self.input_proj(temporal_out), len(self.steps), axis=-1)  # K x (1, d)
        past: list[list[tuple[mx.array, mx.array]]] = [[] for _ in self.layers]
        token = text_token
        tokens, logits = [], []
        for k, step in enumerate(self.steps):
            x = inputs[k] + embed_one(step.emb, token)  # (1, d)
            for norms, weights, layer_past in zip(self.layers, step.layers, past):
                x = self._layer(norms, weights, x, layer_past)
            step_logits = step.linear_out(x)  # (1, audio_card)
            token = sampler(step_logits, k)
            tokens.append(token)
            logits.append(step_logits)
        return mx.concatenate(tokens), mx.concatenate(logits)

    def _layer(self, norms, weights, x: mx.array, past: list[tuple[mx.array, mx.array]]) -> mx.array:
        """One layer of one step: `norms` shared by the steps, `weights` this step's own."""
        x = x + weights.self_attn(norms.norm1(x), past)
        return x + weights.gating(norms.norm2(x))
