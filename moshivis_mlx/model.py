"""MoshiVis: Moshi's speech model with an image fed through gated cross-attention."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .config import NORM_MEAN_SQUARE, ModelConfig
from .depformer import Depformer
from .layers import RMSNorm, make_norm
from .sampling import SamplerConfig
from .siglip import SiglipVisionTower
from .temporal import ImageKV, TemporalTransformer


class ImageProjection(nn.Module):
    """SigLIP features -> the language model's width: `norm_xa(proj_xa(x))`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.proj_xa = nn.Linear(cfg.vision.width, cfg.dim, bias=True)
        if cfg.depformer_norm == NORM_MEAN_SQUARE:
            self.norm_xa = make_norm(NORM_MEAN_SQUARE, cfg.dim, cfg.norm_eps)
        else:  # the official norm_xa runs in the input dtype
            self.norm_xa = make_norm(cfg.depformer_norm, cfg.dim, cfg.norm_xa_eps, in_float32=False)

    def __call__(self, features: mx.array) -> mx.array:
        return self.norm_xa(self.proj_xa(features))


class MoshiVis(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.text_emb = nn.Embedding(cfg.text_card + 1, cfg.dim)
        self.audio_embs = [nn.Embedding(cfg.audio_card + 1, cfg.dim) for _ in range(cfg.num_audio_codebooks)]
        self.transformer = TemporalTransformer(cfg)
        self.out_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.text_linear = nn.Linear(cfg.dim, cfg.text_card, bias=False)
        self.depformer = Depformer(cfg)
        self.image_prefix = ImageProjection(cfg)
        self.vision = SiglipVisionTower(cfg.vision)

    @property
    def dtype(self) -> mx.Dtype:
        """The compute dtype (norm weights are never quantized)."""
        return self.out_norm.weight.dtype

    def embed_tokens(self, tokens: mx.array) -> mx.array:
        """Sum of the 17 stream embeddings; tokens (..., 1 + num_audio_codebooks)."""
        x = self.text_emb(tokens[..., 0])
        for i, emb in enumerate(self.audio_embs):
            x = x + emb(tokens[..., i + 1])
        return x

    def image_kv_from_features(self, features: mx.array) -> ImageKV:
        """SigLIP features (N, vision_width) -> the cross-attention K/V of every layer."""
        expected = self.cfg.vision.width
        if features.ndim != 2 or features.shape[1] != expected:
            raise ValueError(
                f"image features must have shape (num_tokens, {expected}), got {tuple(features.shape)}"
            )
        embeddings = self.image_prefix(features.astype(self.dtype))
        return self.transformer.cross_attention.image_kv(embeddings)

    def text_logits(self, temporal_out: mx.array) -> mx.array:
        return self.text_linear(temporal_out)

    def stream(
        self,
        image: "ImageKV | mx.array | None" = None,
        *,
        greedy: bool = False,
        sampler: SamplerConfig | None = None,
    ):
        """Start a streaming conversation; see `Stream.step`."""
        from .stream import Stream

        return Stream(self, image=image, greedy=greedy, sampler=sampler)
