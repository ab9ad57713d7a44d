"""Bytes one step reads from memory, computed from the parameters.

    python benchmarks/bench_bytes.py

On Apple Silicon a step is bound by memory bandwidth, so this is its floor:
bytes / bandwidth. Counted per step, for the released shapes:
  * every temporal layer's weights (attention, FFN, and its cross-attention
    gate when the image is on), once;
  * the shared cross-attention's q_proj and out_proj once per layer (32x),
    its kv_proj never (the image K/V are projected once per image);
  * the image K/V once per layer, the KV window once per layer (full: 3000),
    in bf16 or, quantized, packed values plus a bf16 scale and bias per group;
  * one row per looked-up embedding, the text head, the whole depformer.
Nothing is computed: the model is built lazily and only shapes are read.
Prints one JSON line per policy (the levers of issue 21 one at a time, then
the default policies).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

import moshivis_mlx as mv  # noqa: E402
from moshivis_mlx.weights.quantize import QuantizationPolicy, quantization_config  # noqa: E402

GB = 1e9
ACT = 2  # bf16 activations, K/V and image K/V


def cache_bytes_per_value(bits: int | None, group_size: int = 64) -> float:
    """Bytes per stored key or value element: bf16, or packed bits plus a bf16 scale and bias per group."""
    return ACT if bits is None else bits / 8 + 2 * ACT / group_size


def nbytes(module: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def quantized(cfg: mv.ModelConfig, policy: QuantizationPolicy | None) -> mv.MoshiVis:
    model = mv.MoshiVis(cfg)
    model.set_dtype(mx.bfloat16)
    if policy is not None:
        config = quantization_config(model, policy)
        settings = {k: v for k, v in config.items() if isinstance(v, dict) or v is False}
        nn.quantize(model, class_predicate=lambda path, m: settings.get(path) or False)
    return model


def embedding_row_bytes(emb: nn.Module) -> float:
    rows = emb.weight.shape[0]
    return nbytes(emb) / rows


def bytes_per_step(
    model: mv.MoshiVis, with_image: bool, visible: int, kv_bits: int | None = None, image_kv_bits: int | None = None
) -> dict[str, float]:
    cfg = model.cfg
    kv, image_kv = cache_bytes_per_value(kv_bits), cache_bytes_per_value(image_kv_bits)
    t = model.transformer
    gates = sum(nbytes(layer.cross_gate) for layer in t.layers)
    layers = sum(nbytes(layer) for layer in t.layers) - gates
    xa = t.cross_attention
    parts = {
        "temporal_layers": layers,
        "kv_window": cfg.num_layers * 2 * visible * cfg.dim * kv,
        "embeddings": embedding_row_bytes(model.text_emb) + sum(embedding_row_bytes(e) for e in model.audio_embs),
        "text_head": nbytes(model.text_linear) + nbytes(model.out_norm),
        "depformer": nbytes(model.depformer)
        - sum(nbytes(s.emb) for s in model.depformer.steps)
        + sum(embedding_row_bytes(s.emb) for s in model.depformer.steps),
    }
    if with_image:
        parts["cross_attention_gates"] = gates
        parts["shared_cross_attention_x32"] = cfg.num_layers * (nbytes(xa.q_proj) + nbytes(xa.out_proj))
        parts["image_kv_x32"] = cfg.num_layers * 2 * cfg.vision.num_tokens * cfg.dim * image_kv
    parts["total"] = sum(parts.values())
    return {k: round(v / GB, 3) for k, v in parts.items()}


def setups() -> dict[str, tuple[QuantizationPolicy | None, int | None, int | None]]:
    """Name -> (weight policy, KV window bits, image K/V bits)."""
    q4 = QuantizationPolicy.mixed(4, cross_attention_bits=8, depformer_bits=8)  # the 4-bit policy before issue 21
    return {
        "bf16": (None, None, None),
        "q4 mixed before": (q4, None, None),
        "q4 mixed + kv 8-bit": (q4, 8, None),
        "q4 mixed + kv 4-bit": (q4, 4, None),
        "q4 mixed + image kv 8-bit": (q4, None, 8),
        "q4 mixed + cross-attention q/out 4-bit": (dataclasses.replace(q4, cross_attention_bits=4), None, None),
        "q4 mixed + depformer 4-bit": (dataclasses.replace(q4, depformer_bits=4), None, None),
        "q4 mixed + group 128": (dataclasses.replace(q4, group_size=128), None, None),
        "q4 uniform (as upstream)": (QuantizationPolicy.uniform(4, group_size=32), None, None),
        "q4 uniform (as upstream) + default caches": (QuantizationPolicy.uniform(4, group_size=32), 4, 8),
        "q8 mixed (default)": with_caches(QuantizationPolicy.mixed(8)),
        "q4 mixed (default)": with_caches(QuantizationPolicy.mixed(4)),
    }


def with_caches(policy: QuantizationPolicy) -> tuple[QuantizationPolicy, int | None, int | None]:
    return policy, policy.kv_bits, policy.image_kv_bits


def main() -> None:
    cfg = mv.moshika_vis()
    for name, (policy, kv_bits, image_kv_bits) in setups().items():
        model = quantized(cfg, policy)
        full = bytes_per_step(model, True, cfg.context, kv_bits, image_kv_bits)
        result = {
            "policy": name,
            "kv_bits": kv_bits,
            "image_kv_bits": image_kv_bits,
            "with_image_full_window_gb": full,
            "with_image_first_256_steps_gb": bytes_per_step(model, True, 256, kv_bits, image_kv_bits)["total"],
            "no_image_full_window_gb": bytes_per_step(model, False, cfg.context, kv_bits, image_kv_bits)["total"],
        }
        print(json.dumps(result))


if __name__ == "__main__":
    main()
