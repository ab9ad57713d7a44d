"""The SigLIP vision tower of PaliGemma2, as MoshiVis uses it (no pooling head).

Parameter names follow Hugging Face's `SiglipVisionTransformer`, so the
released checkpoint maps onto it by dropping a prefix; only the patch
convolution changes layout (PyTorch stores it out x in x kh x kw, we keep
out x kh x kw x in like an MLX conv).

The tower runs at any image size: when the grid of patches differs from the
one the position embeddings were trained on, they are resized with bicubic
interpolation exactly as `transformers`' `interpolate_pos_encoding` does (the
official MoshiVis encoder always passes `interpolate_pos_encoding=True`).
"""

from __future__ import annotations

import math
from functools import partial

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from .config import VisionConfig
from .bicubic import bicubic_matrix

RGB_CHANNELS = 3
GELU_TANH_SCALE = math.sqrt(2 / math.pi)
GELU_TANH_CUBIC = 0.044715


@partial(mx.compile, shapeless=True)
def gelu_tanh(x: mx.array) -> mx.array:
    """transformers' `gelu_pytorch_tanh`, 0.5 x (1 + tanh(z)), written as x sigmoid(2 z).

    The same function; this form avoids `x ** 3` (a transcendental `pow`) and
    one pass, which on MLX's CPU backend makes it about twice as fast as
    `nn.gelu_approx`, and it cannot cancel to 0 - 0 for large negative x.
    """
    return x * mx.sigmoid((2 * GELU_TANH_SCALE) * (x + GELU_TANH_CUBIC * x * x * x))


class PatchEmbedding(nn.Module):
    """The stride = kernel convolution of ViTs, as one reshape and one matmul.

    Like PyTorch's conv, pixels beyond the last whole patch are ignored.
    """

    def __init__(self, width: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.weight = mx.zeros((width, patch_size, patch_size, RGB_CHANNELS))  # MLX conv layout
        self.bias = mx.zeros((width,))

    def __call__(self, pixels: mx.array) -> tuple[mx.array, int, int]:
        """(B, H, W, 3) -> ((B, gh * gw, width), gh, gw)."""
        b, h, w, c = pixels.shape
        p = self.patch_size
        gh, gw = h // p, w // p
        x = pixels[:, : gh * p, : gw * p]
        x = x.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p * p * c)
        weight = self.weight.reshape(self.weight.shape[0], -1)
        return mx.addmm(self.bias.astype(x.dtype), x, weight.T.astype(x.dtype)), gh, gw


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.grid_size = cfg.grid_size  # of the position table
        self.patch_embedding = PatchEmbedding(cfg.width, cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_tokens, cfg.width)

    def positions(self, grid_h: int, grid_w: int) -> mx.array:
        """Position embeddings (gh * gw, width) for a grid of that size."""
        table = self.position_embedding.weight
        if (grid_h, grid_w) == (self.grid_size, self.grid_size):
            return table
        g = self.grid_size
        rows = mx.array(bicubic_matrix(g, grid_h))  # (gh, g)
        cols = mx.array(bicubic_matrix(g, grid_w))  # (gw, g)
        grid = table.astype(mx.float32).reshape(g, g, -1)
        resized = mx.einsum("ai,ijd,bj->abd", rows, grid, cols)
        return resized.reshape(grid_h * grid_w, -1).astype(table.dtype)

    def __call__(self, pixels: mx.array) -> mx.array:
        """(B, H, W, 3) in [-1, 1] -> (B, N, width)."""
        x, gh, gw = self.patch_embedding(pixels)
        return x + self.positions(gh, gw).astype(x.dtype)


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
        return self.fc2(gelu_tanh(self.fc1(x)))


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

    @property
    def dtype(self) -> mx.Dtype:
        """The dtype of its float weights (the position table is never quantized)."""
        return self.embeddings.position_embedding.weight.dtype

    def __call__(self, pixels: mx.array) -> mx.array:
        """(B, H, W, 3) normalised to [-1, 1] -> last hidden state (B, N, width).

        Computes in the dtype of `pixels`: float32 pixels through bf16 weights
        run in float32 while the weights stay bf16 in memory.
        """
        if pixels.ndim != 4 or pixels.shape[-1] != RGB_CHANNELS:
            raise ValueError(f"pixels must have shape (B, H, W, 3), got {tuple(pixels.shape)}")
        p = self.cfg.patch_size
        if pixels.shape[1] < p or pixels.shape[2] < p:
            raise ValueError(f"images must be at least {p} x {p} pixels, got {pixels.shape[1]} x {pixels.shape[2]}")
        x = self.embeddings(pixels)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


# -- loading and precision ---------------------------------------------------


def sanitize_patch_embedding(weight: mx.array, cfg: VisionConfig) -> mx.array:
    """Patch convolution weight in PyTorch (out, in, kh, kw) or MLX (out, kh, kw, in)
    layout -> MLX layout. Idempotent; any other shape is an error."""
    p, c = cfg.patch_size, RGB_CHANNELS
    mlx_shape, torch_shape = (cfg.width, p, p, c), (cfg.width, c, p, p)
    shape = tuple(weight.shape)
    if shape == torch_shape and shape != mlx_shape:
        return weight.transpose(0, 2, 3, 1)
    if shape == mlx_shape:
        return weight
    raise ValueError(
        f"patch embedding weight has shape {shape}; expected {torch_shape} (PyTorch) or {mlx_shape} (MLX)"
    )


def is_quantizable_vision_layer(path: str, module: nn.Module) -> bool:
    """Only the Linear layers of the encoder blocks.

    The patch embedding (0.2 % of the weights) and the position table (added,
    not multiplied, and resized when the image size changes) stay in floating
    point: quantizing them would save almost nothing and add error to every
    token.
    """
    return isinstance(module, nn.Linear) and path.startswith("encoder.")


class VisionQuantizedLinear(nn.QuantizedLinear):
    """A quantized Linear of the vision tower, in MLX's affine format.

    Input widths that are not a multiple of the group size are padded with
    zero columns (So400m's fc2 has 4304 = 67.25 x 64 inputs, which MLX cannot
    quantize as is); the padding never reaches the result. On a CPU,
    `cpu.model.CpuVisionQuantizedLinear` takes its place.
    """

    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        bias: bool = True,
        group_size: int = 64,
        bits: int = 8,
        mode: str = "affine",
    ):
        padded = -(-input_dims // group_size) * group_size
        super().__init__(padded, output_dims, bias, group_size, bits, mode)
        self.input_dims = input_dims
        self.padding = padded - input_dims

    def _extra_repr(self) -> str:
        return super()._extra_repr().replace(f"input_dims={self.input_dims + self.padding}", f"input_dims={self.input_dims}")

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 64, bits: int = 8, mode: str = "affine"):
        output_dims, input_dims = linear.weight.shape
        layer = cls(input_dims, output_dims, "bias" in linear, group_size, bits, mode)
        weight = mx.pad(linear.weight, [(0, 0), (0, layer.padding)]) if layer.padding else linear.weight
        layer.weight, layer.scales, *biases = mx.quantize(weight, group_size, bits, mode=mode)
        layer.biases = biases[0] if biases else None
        if "bias" in linear:
            layer.bias = linear.bias
        return layer

    @classmethod
    def from_quantized(cls, layer: nn.QuantizedLinear) -> "VisionQuantizedLinear":
        """The same parameters (no padding) with this class's kernels."""
        output_dims, packed = layer["weight"].shape
        new = cls(packed * 32 // layer.bits, output_dims, "bias" in layer, layer.group_size, layer.bits, layer.mode)
        new.update(layer.parameters())
        return new

    def __call__(self, x: mx.array) -> mx.array:
        if self.padding:
            x = mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, self.padding)])
        return super().__call__(x)


def quantize_vision_tower(tower: SiglipVisionTower, bits: int = 8, group_size: int = 64) -> None:
    """Quantize the tower's encoder Linear layers in place (`weight` uint32,
    `scales`, `biases` as MLX stores them; inputs padded to the group size)."""

    def convert(path: str, module: nn.Module) -> nn.Module:
        if is_quantizable_vision_layer(path, module):
            return VisionQuantizedLinear.from_linear(module, group_size=group_size, bits=bits)
        return module

    leaves = tree_map_with_path(convert, tower.leaf_modules(), is_leaf=nn.Module.is_module)
    tower.update_modules(leaves)


def use_vision_kernels(tower: SiglipVisionTower) -> None:
    """Turn plain nn.QuantizedLinear layers of the tower (as a generic quantization
    policy makes them) into VisionQuantizedLinear: same parameters, so weights
    load as before, and the CPU counterpart can take their place."""

    def convert(path: str, module: nn.Module) -> nn.Module:
        if isinstance(module, nn.QuantizedLinear) and not isinstance(module, VisionQuantizedLinear):
            return VisionQuantizedLinear.from_quantized(module)
        return module

    tower.update_modules(tree_map_with_path(convert, tower.leaf_modules(), is_leaf=nn.Module.is_module))
