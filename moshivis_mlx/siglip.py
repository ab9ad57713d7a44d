"""The SigLIP vision tower of PaliGemma2, as MoshiVis uses it (no pooling head).

Parameter names follow Hugging Face's `SiglipVisionTransformer`, so the
released checkpoint maps onto it by dropping a prefix; only the patch
convolution needs a transpose (PyTorch stores it out x in x kh x kw).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .config import VisionConfig


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.patch_embedding = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_tokens, cfg.width)

    def __call__(self, pixels: mx.array) -> mx.array:
        """(B, H, W, 3) in [-1, 1] -> (B, N, width)."""
        x = self.patch_embedding(pixels)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        return x + self.position_embedding.weight.astype(x.dtype)


class SiglipAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.scale = cfg.head_dim**-0.5
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def __call__(self, x: mx.array) -> mx.array:
        b, n, _ = x.shape

        def heads(t: mx.array) -> mx.array:
            return t.reshape(b, n, self.num_heads, -1).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        y = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.out_proj(y.transpose(0, 2, 1, 3).reshape(b, n, -1))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_hidden)
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.width)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(nn.gelu_approx(self.fc1(x)))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = [SiglipEncoderLayer(cfg) for _ in range(cfg.num_layers)]


class SiglipVisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def __call__(self, pixels: mx.array) -> mx.array:
        """(B, H, W, 3) normalised to [-1, 1] -> last hidden state (B, N, width)."""
        x = self.embeddings(pixels)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


def sanitize_patch_embedding(weight: mx.array) -> mx.array:
    """PyTorch conv (out, in, kh, kw) -> MLX conv (out, kh, kw, in)."""
    return weight.transpose(0, 2, 3, 1)
