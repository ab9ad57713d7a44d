"""Tensor layouts of released checkpoints, mapped onto this project's names.

Every function here is pure (dict in, dict out), takes each input tensor
exactly once, and leaves anything it does not recognise in the input so the
caller can report it. Layouts are recognised from tensor names, never from
file names.
"""

from __future__ import annotations

import mlx.core as mx

from ..model.config import ModelConfig, VisionConfig
from ..model.siglip import sanitize_patch_embedding

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


# Parts a Linear/Embedding may have on disk: its weight, an optional bias, and
# for affine-quantized layers the packed uint32 weight plus scales and biases.
_MODULE_PARTS = ("weight", "bias", "scales", "biases")


def _take_module(weights: dict[str, mx.array], prefix: str, missing: list[str]) -> dict[str, mx.array]:
    """Every stored part of the module at `prefix` (weight required)."""
    if f"{prefix}.weight" not in weights:
        missing.append(f"{prefix}.weight")
        return {}
    return {part: weights.pop(f"{prefix}.{part}") for part in _MODULE_PARTS if f"{prefix}.{part}" in weights}


def _concat_rows(modules: list[dict[str, mx.array]], name: str) -> dict[str, mx.array]:
    """Stack Linear layers along their outputs.

    Exact for quantized layers too: affine groups run along each row, so the
    packed weight, scales and biases of every row are independent of the others.
    """
    parts = set(modules[0])
    for m in modules[1:]:
        if set(m) != parts:
            raise LayoutError(f"{name}: the per-step layers are not stored alike ({sorted(parts)} vs {sorted(m)})")
        for part in parts:
            if m[part].shape[1:] != modules[0][part].shape[1:] or m[part].dtype != modules[0][part].dtype:
                raise LayoutError(f"{name}: the per-step layers have different {part} shapes or dtypes")
    return {part: mx.concatenate([m[part] for m in modules], axis=0) for part in sorted(parts)}


def from_upstream_mlx(weights: dict[str, mx.array], cfg: ModelConfig) -> tuple[dict[str, mx.array], list[str]]:
    """Upstream MLX layout (kyutai/moshika-vis-mlx, bf16 or quantized) -> ours.

    Consumes `weights`; returns (ours, missing names). Quantized layers keep
    their packed weight, scales and biases under our module names. Two upstream
    redundancies are resolved here:
    * the 8 depformer slices each carry a copy of the shared norms: they must
      be equal (checked) and one is kept;
    * the shared cross-attention lives under layer 0; the quantized files also
      hold partial copies under the other layers (not the kv_proj weight).
      Upstream's own loader overwrites them with layer 0's before use, so they
      are dropped unread.
    """
    out: dict[str, mx.array] = {}
    missing: list[str] = []

    def move(src: str, dst: str) -> None:
        for part, value in _take_module(weights, src, missing).items():
            out[f"{dst}.{part}"] = value

    def move_vector(src: str, dst: str) -> None:
        value = _take(weights, src, missing)
        if value is not None:
            out[dst] = value

    move("text_emb", "text_emb")
    for i in range(cfg.num_audio_codebooks):
        move(f"audio_embs.{i}", f"audio_embs.{i}")
    for l in range(cfg.num_layers):
        src = dst = f"transformer.layers.{l}"
        for norm in ("norm1", "norm2", "norm_cross"):
            move_vector(f"{src}.{norm}.weight", f"{dst}.{norm}.weight")
        for linear in ("self_attn.in_proj", "self_attn.out_proj", "gating.linear_in", "gating.linear_out"):
            move(f"{src}.{linear}", f"{dst}.{linear}")
        move(f"{src}.cross_attention.gate.alpha.layers.0", f"{dst}.cross_gate.linear_in")
        move(f"{src}.cross_attention.gate.alpha.layers.2", f"{dst}.cross_gate.linear_out")
        if l > 0:
            copies = [n for n in weights if n.startswith(f"{src}.cross_attention.mha.")]
            for name in copies:
                del weights[name]
    for proj in ("q_proj", "kv_proj", "out_proj"):
        move(f"transformer.layers.0.cross_attention.mha.{proj}", f"transformer.cross_attention.{proj}")
    move_vector("out_norm.weight", "out_norm.weight")
    move("text_linear", "text_linear")

    steps = cfg.depformer.num_steps
    slices = [f"depformer.slices.{k}" for k in range(steps)]
    inputs = [_take_module(weights, f"{s}.linear_in", missing) for s in slices]
    if all(inputs):
        for part, value in _concat_rows(inputs, "depformer.slices.*.linear_in").items():
            out[f"depformer.input_proj.{part}"] = value
    for k, s in enumerate(slices):
        move(f"{s}.emb", f"depformer.steps.{k}.emb")
        move(f"{s}.linear_out", f"depformer.steps.{k}.linear_out")
        for l in range(cfg.depformer.num_layers):
            for linear in ("self_attn.in_proj", "self_attn.out_proj", "gating.linear_in", "gating.linear_out"):
                move(f"{s}.transformer.layers.{l}.{linear}", f"depformer.steps.{k}.layers.{l}.{linear}")
    for l in range(cfg.depformer.num_layers):
        for norm in ("norm1", "norm2"):
            names = [f"{s}.transformer.layers.{l}.{norm}.weight" for s in slices]
            copies = [_take(weights, n, missing) for n in names]
            if any(c is None for c in copies):
                continue
            if any(c.shape != copies[0].shape or not mx.array_equal(c, copies[0]).item() for c in copies[1:]):
                raise LayoutError(
                    f"depformer.slices.*.transformer.layers.{l}.{norm}.weight differ between slices; "
                    "MoshiVis shares one norm across the depformer steps"
                )
            out[f"depformer.layers.{l}.{norm}.weight"] = copies[0]

    move("transformer.image_prefix.proj_xa", "image_prefix.proj_xa")
    move_vector("transformer.image_prefix.norm_xa.weight", "image_prefix.norm_xa.weight")
    out.update(vision_from_hf(weights, "img_embedder.model.", cfg.vision))
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

