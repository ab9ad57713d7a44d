"""Tensor layouts of released checkpoints, mapped onto this project's names.

Every function here is pure (dict in, dict out), takes each input tensor
exactly once, and leaves anything it does not recognise in the input so the
caller can report it. Layouts are recognised from tensor names, never from
file names.
"""

from __future__ import annotations

import mlx.core as mx

from .config import ModelConfig, VisionConfig
from .siglip import sanitize_patch_embedding

LAYOUT_PYTORCH = "pytorch"  # kyutai/moshika-vis-pytorch-bf16
LAYOUT_UPSTREAM_MLX = "upstream-mlx"  # kyutai/moshika-vis-mlx
LAYOUT_NATIVE = "moshivis-mlx"  # this project

_MARKERS = {
    LAYOUT_PYTORCH: "llm.text_emb.weight",
    LAYOUT_UPSTREAM_MLX: "depformer.slices.0.linear_in.weight",
    LAYOUT_NATIVE: "depformer.input_proj.weight",
}


PATCH_EMBEDDING_WEIGHT = "embeddings.patch_embedding.weight"


def detect_layout(names) -> str | None:
    names = set(names)
    for layout, marker in _MARKERS.items():
        if marker in names:
            return layout
    return None


class LayoutError(ValueError):
    """Tensors are missing or have the wrong shape for the configured model."""


def _take(weights: dict[str, mx.array], name: str, missing: list[str]) -> mx.array | None:
    if name not in weights:
        missing.append(name)
        return None
    return weights.pop(name)


def _norm(alpha: mx.array | None) -> mx.array | None:
    """PyTorch norms store (1, 1, d); ours are (d,)."""
    return None if alpha is None else alpha.reshape(-1)


def _chunks(w: mx.array | None, n: int, name: str) -> list[mx.array | None]:
    if w is None:
        return [None] * n
    if w.shape[0] % n:
        raise LayoutError(f"{name} has {w.shape[0]} rows, not divisible into {n} per-step chunks")
    return list(mx.split(w, n, axis=0))


def from_pytorch(weights: dict[str, mx.array], cfg: ModelConfig) -> tuple[dict[str, mx.array], list[str]]:
    """Official PyTorch layout -> ours. Consumes `weights`; returns (ours, missing names).

    Whatever stays in `weights` afterwards was not recognised.
    """
    out: dict[str, mx.array] = {}
    missing: list[str] = []

    def take(name: str) -> mx.array | None:
        return _take(weights, name, missing)

    def put(name: str, value: mx.array | None) -> None:
        if value is not None:
            out[name] = value

    put("text_emb.weight", take("llm.text_emb.weight"))
    for i in range(cfg.num_audio_codebooks):
        put(f"audio_embs.{i}.weight", take(f"audio_emb.{i}.weight"))
    for l in range(cfg.num_layers):
        src, dst = f"llm.transformer.layers.{l}", f"transformer.layers.{l}"
        for norm in ("norm1", "norm2", "norm_cross"):
            put(f"{dst}.{norm}.weight", _norm(take(f"{src}.{norm}.alpha")))
        put(f"{dst}.self_attn.in_proj.weight", take(f"{src}.self_attn.in_proj_weight"))
        put(f"{dst}.self_attn.out_proj.weight", take(f"{src}.self_attn.out_proj.weight"))
        put(f"{dst}.cross_gate.linear_in.weight", take(f"{src}.cross_attention.gate.alpha.0.weight"))
        put(f"{dst}.cross_gate.linear_out.weight", take(f"{src}.cross_attention.gate.alpha.2.weight"))
        put(f"{dst}.gating.linear_in.weight", take(f"{src}.gating.linear_in.weight"))
        put(f"{dst}.gating.linear_out.weight", take(f"{src}.gating.linear_out.weight"))
    # The shared cross-attention is stored once, under layer 0.
    shared = "llm.transformer.layers.0.cross_attention.mha"
    in_proj = take(f"{shared}.in_proj_weight")
    if in_proj is not None:
        put("transformer.cross_attention.q_proj.weight", in_proj[: cfg.dim])
        put("transformer.cross_attention.kv_proj.weight", in_proj[cfg.dim :])
    put("transformer.cross_attention.out_proj.weight", take(f"{shared}.out_proj.weight"))
    put("out_norm.weight", _norm(take("llm.out_norm.alpha")))
    put("text_linear.weight", take("llm.text_linear.weight"))

    steps = cfg.depformer.num_steps
    inputs = [take(f"depformer_in.{k}.weight") for k in range(steps)]
    if all(w is not None for w in inputs):
        put("depformer.input_proj.weight", mx.concatenate(inputs, axis=0))
    for k in range(steps):
        emb = "depformer_text_emb.weight" if k == 0 else f"depformer_emb.{k - 1}.weight"
        put(f"depformer.steps.{k}.emb.weight", take(emb))
        put(f"depformer.steps.{k}.linear_out.weight", take(f"audio_linears.{k}.weight"))
    for l in range(cfg.depformer.num_layers):
        src = f"depformer.layers.{l}"
        put(f"depformer.layers.{l}.norm1.weight", _norm(take(f"{src}.norm1.alpha")))
        put(f"depformer.layers.{l}.norm2.weight", _norm(take(f"{src}.norm2.alpha")))
        qkv = _chunks(take(f"{src}.self_attn.in_proj_weight"), steps, f"{src}.self_attn.in_proj_weight")
        proj = _chunks(take(f"{src}.self_attn.out_proj.weight"), steps, f"{src}.self_attn.out_proj.weight")
        for k in range(steps):
            dst = f"depformer.steps.{k}.layers.{l}"
            put(f"{dst}.self_attn.in_proj.weight", qkv[k])
            put(f"{dst}.self_attn.out_proj.weight", proj[k])
            put(f"{dst}.gating.linear_in.weight", take(f"{src}.gating.{k}.linear_in.weight"))
            put(f"{dst}.gating.linear_out.weight", take(f"{src}.gating.{k}.linear_out.weight"))

    put("image_prefix.proj_xa.weight", take("image_prefix.proj_xa.weight"))
    put("image_prefix.proj_xa.bias", take("image_prefix.proj_xa.bias"))
    put("image_prefix.norm_xa.weight", _norm(take("image_prefix.norm_xa.alpha")))
    out.update(vision_from_hf(weights, "image_prefix.enc.model.", cfg.vision))
    return out, missing


def vision_from_hf(
    weights: dict[str, mx.array], prefix: str, cfg: VisionConfig, out_prefix: str = "vision."
) -> dict[str, mx.array]:
    """Hugging Face `SiglipVisionTransformer` names under `prefix` -> `out_prefix` + the
    same names. Consumes them.

    Only the patch convolution changes: PyTorch (out, in, kh, kw) becomes MLX
    (out, kh, kw, in); a weight already in MLX layout is kept, so converting
    twice is harmless, and any other shape is a LayoutError.
    """
    out = {}
    for name in [n for n in weights if n.startswith(prefix)]:
        value = weights.pop(name)
        local = name[len(prefix) :]
        if local == PATCH_EMBEDDING_WEIGHT:
            try:
                value = sanitize_patch_embedding(value, cfg)
            except ValueError as e:
                raise LayoutError(f"{name}: {e}") from None
        out[out_prefix + local] = value
    return out

