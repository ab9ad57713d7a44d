"""MoshiVis: Moshi's speech model with an image fed through gated cross-attention."""

from __future__ import annotations

import numpy as np
import mlx.core as mx
import mlx.nn as nn

from ..cpu.platform_path import GPU_PATH, PlatformPath
from ..weights.quantize import CACHE_BITS, CACHE_GROUP_SIZE, fit_group_size
from .config import NORM_MEAN_SQUARE, ModelConfig
from .depformer import Depformer
from .image import FIT_STRETCH, ImageSource, preprocess
from .layers import CacheQuantization, RMSNorm, embed_one, make_norm
from .sampling import SamplerConfig
from .siglip import SiglipVisionTower, quantize_vision_tower
from .temporal import ImageKV, TemporalTransformer

VISION_QUANT_BITS = 8
VISION_QUANT_GROUP = 64


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
        # What a GPU runs until `cpu.platform_path.apply_platform_path` says otherwise (`load` does).
        self.platform_path: PlatformPath = GPU_PATH

    @property
    def dtype(self) -> mx.Dtype:
        """The compute dtype (norm weights are never quantized)."""
        return self.out_norm.weight.dtype

    def embed_tokens(self, tokens: mx.array) -> mx.array:
        """Sum of the 17 stream embeddings; tokens (..., 1 + num_audio_codebooks).

        One step's tokens come 1-D, (17,), and give (1, dim): they are split
        with one operation and each row is read with one more (`embed_one`),
        where slicing and indexing each token would cost three."""
        tables = [self.text_emb, *self.audio_embs]
        if tokens.ndim == 1:
            rows = [embed_one(table, token) for table, token in zip(tables, mx.split(tokens, tokens.shape[0]))]
        else:
            rows = [table(tokens[..., i]) for i, table in enumerate(tables)]
        x = rows[0]
        for row in rows[1:]:
            x = x + row
        return x

    def image_kv_from_features(self, features: mx.array) -> ImageKV:
        """SigLIP features (N, vision_width) -> the cross-attention K/V of every layer."""
        expected = self.cfg.vision.width
        if features.ndim != 2 or features.shape[1] != expected:
            raise ValueError(
                f"image features must have shape (num_tokens, {expected}), got {tuple(features.shape)}"
            )
        compute = self._image_kv_compute_dtype()
        embeddings = self.image_prefix(features.astype(compute))
        xa = self.transformer.cross_attention
        kv = xa.image_kv(embeddings)
        stored = xa.compute_dtype(self.dtype)  # what the cross-attention reads them in
        if compute != stored:
            kv = ImageKV(kv.keys.astype(stored), kv.values.astype(stored))
        return kv.quantized(self.transformer.image_kv_quantization)

    def _image_kv_compute_dtype(self) -> mx.Dtype:
        """The platform path's image dtype (float32 on a CPU with a fast BLAS), else the model's.

        Projecting 1024 image tokens (1152 -> 4096 -> 2 x 4096) is ~80 GFLOP:
        20-23 s through MLX's CPU bf16 matmul, 1.1 s through BLAS in float32
        (full size, here). Once per image, so the upcast weights are transient.
        """
        image_dtype = self.platform_path.image_dtype
        return getattr(mx, image_dtype) if image_dtype else self.dtype

    def vision_compute_dtype(self) -> mx.Dtype:
        """What SigLIP computes in: the platform path's image dtype, else the tower's weights' dtype.

        On a CPU only float32 matmuls reach BLAS, ~10x faster than MLX's own
        bf16 ones; bf16 weights are then upcast one matrix at a time.
        """
        image_dtype = self.platform_path.image_dtype
        return getattr(mx, image_dtype) if image_dtype else self.vision.dtype

    def encode_image(
        self,
        image: ImageSource,
        *,
        image_size: int | None = None,
        fit: str = FIT_STRETCH,
        dtype: mx.Dtype | None = None,
    ) -> mx.array:
        """An image (path, bytes, PIL.Image, uint8 array) -> SigLIP features (N, width).

        `image_size` (default: the encoder's native size, 448 for the release)
        may differ from the native size: the position embeddings are then
        interpolated as the official encoder does. `dtype` is the compute dtype
        of the tower (default: `vision_compute_dtype`).
        """
        size = image_size or self.cfg.vision.image_size
        if size < self.cfg.vision.patch_size:
            raise ValueError(f"image_size must be at least the patch size {self.cfg.vision.patch_size}, got {size}")
        if isinstance(image, mx.array):
            image = np.array(image)
        pixels = mx.array(preprocess(image, size, fit))[None]
        return self.vision(pixels.astype(dtype or self.vision_compute_dtype()))[0]

    def embed_image(
        self,
        image: "ImageKV | ImageSource | mx.array",
        *,
        image_size: int | None = None,
        fit: str = FIT_STRETCH,
        dtype: mx.Dtype | None = None,
    ) -> ImageKV:
        """Anything that describes an image -> its cross-attention K/V, computed once.

        `image` is an ImageKV (returned as is), SigLIP features (N, width), a
        file path, the bytes of an image file, a PIL.Image or a uint8 array
        (H, W, 3). The result is evaluated before returning, so nothing
        image-sized stays alive but the K/V. See `encode_image` for the options.
        """
        if isinstance(image, ImageKV):
            return image.quantized(self.transformer.image_kv_quantization)
        if _is_features(image):
            kv = self.image_kv_from_features(mx.array(image))
        else:
            kv = self.image_kv_from_features(self.encode_image(image, image_size=image_size, fit=fit, dtype=dtype))
        mx.eval(kv.arrays)  # detaches the K/V from the pixels and features
        return kv

    def quantize_caches(
        self, kv_bits: int | None = None, image_kv_bits: int | None = None, group_size: int = CACHE_GROUP_SIZE
    ) -> None:
        """Store the KV window (of streams started from now on) and the image K/V
        (embedded from now on) at `kv_bits` / `image_kv_bits`, or in the compute
        dtype with None.

        Both are read by every layer at every step: ~2.1 GB in bf16 with a full
        window and the image on, a quarter of a 4-bit step's bytes. A head
        dimension no supported group divides (tiny test models) keeps them float.
        """
        for name, bits in (("kv_bits", kv_bits), ("image_kv_bits", image_kv_bits)):
            if bits is not None and bits not in CACHE_BITS:
                raise ValueError(f"{name} must be one of {CACHE_BITS} or None, got {bits!r}")
        group = fit_group_size(self.cfg.head_dim, group_size)

        def make(bits: int | None) -> CacheQuantization | None:
            return None if bits is None or group is None else CacheQuantization(bits, group)

        self.transformer.kv_quantization = make(kv_bits)
        self.transformer.image_kv_quantization = make(image_kv_bits)

    @property
    def cache_quantization(self) -> dict | None:
        """How the caches are stored, as config.json records it (`weights.quantize.cache_record`); None if float."""
        t = self.transformer
        used = t.kv_quantization or t.image_kv_quantization
        if used is None:
            return None
        return {
            "kv_bits": t.kv_quantization.bits if t.kv_quantization else None,
            "image_kv_bits": t.image_kv_quantization.bits if t.image_kv_quantization else None,
            "group_size": used.group_size,
        }

    def cast_vision(self, dtype: mx.Dtype) -> None:
        """Keep the vision tower's float weights in `dtype` (e.g. mx.bfloat16)."""
        self.vision.set_dtype(dtype)
        mx.eval(self.vision.parameters())

    def quantize_vision(self, bits: int = VISION_QUANT_BITS, group_size: int = VISION_QUANT_GROUP) -> None:
        """Quantize the vision tower's encoder Linear layers (see `siglip.is_quantizable_vision_layer`)."""
        quantize_vision_tower(self.vision, bits=bits, group_size=group_size)
        mx.eval(self.vision.parameters())

    def float32_on_cpu_parts(self) -> list[nn.Module]:
        """What `load(dtype="auto")` computes in float32 on a CPU for an unquantized model.

        MLX multiplies bf16 weights by one row in a scalar loop (~1.8 GB/s of
        weights here) and float32 ones through BLAS (~15 GB/s), so the parts
        that are small for what a step reads of them are upcast: the depformer
        (1.3 GB more, ~3x faster), and the cross-attention read by all 32
        layers with each layer's gate (0.4 GB more: ~2.4 GB read per step in
        bf16). The temporal layers stay bf16: in float32 they would not fit
        a 24 GB machine.
        """
        return [self.depformer, self.transformer.cross_attention] + [
            layer.cross_gate for layer in self.transformer.layers
        ]

    def text_logits(self, temporal_out: mx.array) -> mx.array:
        return self.text_linear(temporal_out)

    def stream(
        self,
        image: "ImageKV | ImageSource | mx.array | None" = None,
        *,
        greedy: bool = False,
        sampler: SamplerConfig | None = None,
    ):
        """Start a streaming conversation; see `Stream.step`. `image` is anything
        `embed_image` accepts, or None for no image."""
        from .stream import Stream

        return Stream(self, image=image, greedy=greedy, sampler=sampler)


def _is_features(image) -> bool:
    """Encoder features are 2-D floating arrays; pixels are uint8 and 2-D or 3-D."""
    if isinstance(image, mx.array):
        return image.ndim == 2 and mx.issubdtype(image.dtype, mx.floating)
    if isinstance(image, np.ndarray):
        return image.ndim == 2 and np.issubdtype(image.dtype, np.floating)
    return False
