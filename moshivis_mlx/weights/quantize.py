"""Which MoshiVis weights are quantized, and at how many bits.

The policy is decided per module path, not left to whatever `nn.quantize`
reaches. Default ("mixed") tiers, from cheapest to most sensitive:

* temporal transformer layers (self-attention, FFN, per-layer cross-attention
  gates): `bits`. They hold 81 % of the weights and run once per frame, so
  they decide both the memory and the speed. The gates are safe there: their
  output goes through `sigmoid(. - 4)`, whose slope is below 0.02 at rest, so
  weight noise barely moves the gate.
* embeddings, the text head, the shared cross-attention and the whole
  depformer: `sensitive_bits` (8 by default, or kept in float). Embedding
  errors of the 17 summed streams add up; the text head and the depformer turn
  straight into tokens (the depformer runs 8 times per frame, so each step's
  error lands on an audio codebook); the cross-attention is shared by every
  layer, so its error is paid 32 times. Together they are 14 % of the weights.
* image projection (`proj_xa`, 4.7 M weights, feeds every cross-attention):
  kept in float.
* norms: never quantized (vectors, not matrices).
* vision tower: kept in float unless `vision_bits` is given. Its position
  embedding is read as a matrix and its patch embedding is a convolution, so
  neither is ever quantized.

A module whose input width is not divisible by the group size falls back to
the largest smaller group size that divides it, else stays in float; the
choice is recorded per module, so the loader never has to guess.

Quantization configs use mlx-lm's format: top-level `bits`, `group_size`,
`mode` (the defaults), plus one entry per quantizable module path, either a
dict of `to_quantized` arguments or `false` (kept in float).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

BITS_CHOICES = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64
SENSITIVE_BITS = 8
# The KV window and the image K/V (activations every layer reads at every step) may be
# stored quantized too (see `MoshiVis.quantize_caches`), in groups along the head dimension.
CACHE_BITS = (4, 5, 6, 8)
CACHE_GROUP_SIZE = 64
_DEFAULT = "default"  # a tier left to the policy's default for its body bits
MODE = "affine"
_TOP_LEVEL_KEYS = ("bits", "group_size", "mode")

# Module paths that are never quantized whatever the policy: the vision
# position embedding is added as a matrix (its `.weight` is read directly).
_NEVER = ("vision.embeddings.",)
# The shared cross-attention's projections read by every layer at every step
# (its kv_proj runs once per image).
_CROSS_ATTENTION_PER_LAYER = ("transformer.cross_attention.q_proj", "transformer.cross_attention.out_proj")


class QuantizationError(ValueError):
    """A quantization request that cannot be met."""


@dataclass(frozen=True)
class QuantizationPolicy:
    """Bits per tier of modules; None keeps a tier in float."""

    bits: int  # temporal transformer layers
    group_size: int = DEFAULT_GROUP_SIZE
    sensitive_bits: int | None = SENSITIVE_BITS  # embeddings, text head, the cross-attention's kv_proj
    image_prefix_bits: int | None = None  # proj_xa
    vision_bits: int | None = None  # SigLIP linear layers
    cross_attention_bits: int | None = SENSITIVE_BITS  # the shared cross-attention's q_proj and out_proj
    depformer_bits: int | None = SENSITIVE_BITS  # the depformer's linear layers (not its embeddings)
    kv_bits: int | None = None  # the KV window (None: the compute dtype)
    image_kv_bits: int | None = None  # the image K/V

    def __post_init__(self) -> None:
        for name in ("bits", "sensitive_bits", "image_prefix_bits", "vision_bits", "cross_attention_bits", "depformer_bits"):
            value = getattr(self, name)
            if (value is not None or name == "bits") and value not in BITS_CHOICES:
                raise QuantizationError(f"{name} must be one of {BITS_CHOICES}, got {value!r}")
        for name in ("kv_bits", "image_kv_bits"):
            value = getattr(self, name)
            if value is not None and value not in CACHE_BITS:
                raise QuantizationError(f"{name} must be one of {CACHE_BITS} or None, got {value!r}")
        if self.group_size not in GROUP_SIZES:
            raise QuantizationError(f"group_size must be one of {GROUP_SIZES}, got {self.group_size!r}")

    @classmethod
    def mixed(
        cls,
        bits: int,
        group_size: int = DEFAULT_GROUP_SIZE,
        *,
        sensitive_bits: int | None = SENSITIVE_BITS,
        vision_bits: int | None = None,
        cross_attention_bits: "int | None | str" = _DEFAULT,
        depformer_bits: int | None = SENSITIVE_BITS,
        kv_bits: "int | None | str" = _DEFAULT,
        image_kv_bits: int | None = 8,
    ) -> "QuantizationPolicy":
        """The default: body at `bits`, the other tiers at their own bits (never fewer than `bits`).

        At 4 bits and fewer the shared cross-attention's per-layer projections
        and the KV window default to 4 bits too, the image K/V to 8: with the
        image on and a full window that takes a released-size step from 7.87
        to 5.96 GB, with the text logit error on fixture A unchanged (0.50)
        and the audio one 1.95 -> 2.20 (`benchmarks/bench_quantization.py`).
        The depformer keeps 8 bits: at 4 its audio error grows to 11.
        """
        def at_least_body(tier_bits: int | None) -> int | None:
            return None if tier_bits is None else max(tier_bits, bits)

        low = bits <= 4
        if cross_attention_bits == _DEFAULT:
            cross_attention_bits = 4 if low else SENSITIVE_BITS
        if kv_bits == _DEFAULT:
            kv_bits = 4 if low else 8
        return cls(
            bits,
            group_size,
            sensitive_bits=at_least_body(sensitive_bits),
            vision_bits=vision_bits,
            cross_attention_bits=at_least_body(cross_attention_bits),
            depformer_bits=at_least_body(depformer_bits),
            kv_bits=kv_bits,
            image_kv_bits=image_kv_bits,
        )

    @property
    def caches(self) -> dict | None:
        """The cache record `config.json` keeps (see `cache_record`)."""
        return cache_record(self.kv_bits, self.image_kv_bits)

    @classmethod
    def uniform(cls, bits: int, group_size: int = DEFAULT_GROUP_SIZE, *, vision_bits: int | None = None):
        """Every Linear/Embedding of the language model at `bits` (what upstream kyuteye_mlx does)."""
        return cls(
            bits, group_size, sensitive_bits=bits, image_prefix_bits=bits, vision_bits=vision_bits,
            cross_attention_bits=bits, depformer_bits=bits,
        )

    def bits_for(self, path: str) -> int | None:
        """Bits of the module at `path`, before the group-size check."""
        if path.startswith(_NEVER):
            return None
        if path.startswith("vision."):
            return self.vision_bits
        if path.startswith("image_prefix."):
            return self.image_prefix_bits
        if path.startswith("transformer.layers."):
            return self.bits
        if path in _CROSS_ATTENTION_PER_LAYER:
            return self.cross_attention_bits
        if path.startswith("depformer.") and not path.endswith(".emb"):
            return self.depformer_bits
        return self.sensitive_bits


def cache_record(kv_bits: int | None, image_kv_bits: int | None) -> dict | None:
    """How a model's caches are stored, as config.json records it; None when both are float."""
    if kv_bits is None and image_kv_bits is None:
        return None
    return {"kv_bits": kv_bits, "image_kv_bits": image_kv_bits, "group_size": CACHE_GROUP_SIZE}


def describe_caches(record: dict | None) -> str:
    """'KV window 4-bit, image K/V 8-bit (groups of 64)'."""
    if not record:
        return "KV window and image K/V in the compute dtype"

    def one(bits: int | None) -> str:
        return f"{bits}-bit" if bits else "float"

    return f"KV window {one(record['kv_bits'])}, image K/V {one(record['image_kv_bits'])} (groups of {record['group_size']})"


def default_caches(quantization: dict | None) -> dict | None:
    """The caches of a quantized checkpoint that records none (upstream's files): those of
    the mixed policy at its body's bits. Float checkpoints keep float caches."""
    if not quantization:
        return None
    return QuantizationPolicy.mixed(quantization["bits"]).caches


def read_cache_record(record, source: str) -> dict | None:
    """A config.json `cache_quantization` entry, checked."""
    if record is None:
        return None
    if not isinstance(record, dict) or set(record) != {"kv_bits", "image_kv_bits", "group_size"}:
        raise QuantizationError(f"{source}: cache_quantization must hold kv_bits, image_kv_bits and group_size")
    for name in ("kv_bits", "image_kv_bits"):
        if record[name] is not None and record[name] not in CACHE_BITS:
            raise QuantizationError(f"{source}: cache_quantization {name} must be one of {CACHE_BITS} or null")
    if record["group_size"] not in GROUP_SIZES:
        raise QuantizationError(f"{source}: cache_quantization group_size must be one of {GROUP_SIZES}")
    return record


def fit_group_size(in_dims: int, group_size: int) -> int | None:
    """`group_size`, or the largest smaller supported one dividing `in_dims`."""
    for g in sorted(GROUP_SIZES, reverse=True):
        if g <= group_size and in_dims % g == 0:
            return g
    return None


_QUANTIZED_TYPES = (nn.QuantizedLinear, nn.QuantizedEmbedding)


def quantizable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Path -> module for every leaf that MLX can quantize (Linear, Embedding), or has."""
    return {
        path: m
        for path, m in model.named_modules()
        if path and (hasattr(m, "to_quantized") or isinstance(m, _QUANTIZED_TYPES))
    }


def quantization_config(model: nn.Module, policy: QuantizationPolicy) -> dict:
    """The config entry describing `policy` applied to the (unquantized) `model`."""
    config: dict = {}
    for path, module in sorted(quantizable_modules(model).items()):
        bits = policy.bits_for(path)
        group = fit_group_size(module.weight.shape[-1], policy.group_size) if bits is not None else None
        config[path] = {"bits": bits, "group_size": group, "mode": MODE} if group is not None else False
    return _with_defaults(config)


def module_settings(config: dict | None, model: nn.Module, weight_names) -> dict[str, dict | None]:
    """Path -> to_quantized arguments (or None) for every quantizable module.

    Paths missing from `config` take its top-level defaults when their
    `.scales` are stored, as in mlx-lm.
    """
    names = set(weight_names)
    out: dict[str, dict | None] = {}
    for path in quantizable_modules(model):
        entry = config.get(path) if config else None
        if entry is None and config and f"{path}.scales" in names:
            entry = {k: config[k] for k in _TOP_LEVEL_KEYS if k in config}
        out[path] = dict(entry) if entry else None
    return out


def _stored_quantization(module: nn.Module, packed: mx.array, scales: mx.array) -> dict:
    """Bits, group size and mode that packed weights were stored with.

    The same reading as `mlx_lm.utils.infer_quant_config`, written out here
    because importing `mlx_lm.utils` imports `transformers` (and torch where
    installed): ~10 s added to every `load`. Only affine quantization keeps its
    scales in a float dtype; the other modes are reported as such and refused.
    """
    in_dims = module.weight.shape[-1]
    group_size = in_dims // max(1, scales.shape[-1])
    bits = packed.shape[-1] * 32 // in_dims
    mode = MODE if scales.dtype != mx.uint8 else "floating-point (mxfp/nvfp)"
    return {"group_size": group_size, "bits": bits, "mode": mode}


def infer_quantization(weights: dict[str, mx.array], model: nn.Module, source: str) -> dict | None:
    """Quantization config read from tensor shapes (never from a file name); None if all float.

    `model` must still be unquantized: its layers give the true input widths.
    """
    config: dict = {}
    for path, module in sorted(quantizable_modules(model).items()):
        if f"{path}.scales" not in weights:
            config[path] = False
            continue
        if f"{path}.weight" not in weights or f"{path}.biases" not in weights:
            raise QuantizationError(f"{source}: {path} has scales but no packed weight or biases")
        q = _stored_quantization(module, weights[f"{path}.weight"], weights[f"{path}.scales"])
        in_dims = module.weight.shape[-1]
        packed, scales = weights[f"{path}.weight"], weights[f"{path}.scales"]
        if (
            q["mode"] != MODE
            or q["bits"] not in BITS_CHOICES
            or q["group_size"] not in GROUP_SIZES
            or packed.dtype != mx.uint32
            or packed.shape[-1] * 32 != q["bits"] * in_dims
            or scales.shape[-1] * q["group_size"] != in_dims
        ):
            raise QuantizationError(
                f"{source}: {path} is stored as packed {tuple(packed.shape)} {packed.dtype} with scales "
                f"{tuple(scales.shape)}, which is no affine quantization of a layer of input width {in_dims}"
            )
        config[path] = {"bits": q["bits"], "group_size": q["group_size"], "mode": MODE}
    return _with_defaults(config)


def model_quantization(model: nn.Module) -> dict | None:
    """The quantization config of a model's current layers; None if none is quantized."""
    config: dict = {}
    for path, module in sorted(quantizable_modules(model).items()):
        quantized = isinstance(module, _QUANTIZED_TYPES)
        config[path] = {"bits": module.bits, "group_size": module.group_size, "mode": module.mode} if quantized else False
    return _with_defaults(config)


_BODY = "transformer.layers."


def _with_defaults(config: dict) -> dict | None:
    """Add mlx-lm's top-level defaults; None if nothing is quantized.

    The defaults are the temporal transformer's most common setting (the
    `--bits` a user asked for), so they read the same whether the config comes
    from a policy, from tensor shapes or from a loaded model.
    """
    body = Counter((q["bits"], q["group_size"]) for p, q in config.items() if q and p.startswith(_BODY))
    used = body or Counter((q["bits"], q["group_size"]) for q in config.values() if q)
    if not used:
        return None
    (bits, group_size), _ = used.most_common(1)[0]
    return {"bits": bits, "group_size": group_size, "mode": MODE, **config}


def same_quantization(a: dict | None, b: dict | None, model: nn.Module, weight_names) -> bool:
    names = list(weight_names)
    return module_settings(a, model, names) == module_settings(b, model, names)


def quantize_weights(weights: dict[str, mx.array], config: dict, model: nn.Module) -> dict[str, mx.array]:
    """Float weights -> affine-quantized ones, lazily, as `config` says. Consumes `weights`."""
    out = dict(weights)
    weights.clear()
    for path, q in module_settings(config, model, ()).items():
        if not q:
            continue
        w = out.pop(f"{path}.weight")
        if not mx.issubdtype(w.dtype, mx.floating):
            raise QuantizationError(f"{path} is already quantized ({w.dtype}); it cannot be quantized twice")
        out[f"{path}.weight"], out[f"{path}.scales"], out[f"{path}.biases"] = mx.quantize(
            w, group_size=q["group_size"], bits=q["bits"], mode=q["mode"]
        )
    return out


def apply_quantization(model: nn.Module, config: dict, weight_names) -> None:
    """Swap the model's layers for quantized ones so `config`'s weights load strictly."""
    settings = module_settings(config, model, weight_names)
    nn.quantize(model, class_predicate=lambda path, module: settings.get(path) or False)


def describe(config: dict | None, model: nn.Module, weight_names=()) -> str:
    """'4-bit/g64: 8 modules, 8-bit/g64: 60 modules, float: 3 modules'."""
    if not config:
        return "not quantized"
    counts = Counter(
        (q["bits"], q["group_size"]) if q else None for q in module_settings(config, model, weight_names).values()
    )
    parts = [f"{b}-bit/g{g}: {n} modules" for (b, g), n in sorted((k, v) for k, v in counts.items() if k)]
    if counts.get(None):
        parts.append(f"float: {counts[None]} modules")
    return ", ".join(parts)
