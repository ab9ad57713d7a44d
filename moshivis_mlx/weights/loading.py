"""`moshivis_mlx.load`: a checkpoint file or directory -> a ready `MoshiVis`."""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ..cpu.platform_path import PlatformPath, apply_platform_path, choose_platform_path
from ..model.config import ModelConfig, moshika_vis
from ..model.model import MoshiVis
from ..model.siglip import use_vision_kernels
from .checkpoint import CheckpointError, load_safetensors
from .layouts import (
    LAYOUT_NATIVE,
    LAYOUT_PYTORCH,
    LAYOUT_UPSTREAM_MLX,
    LayoutError,
    detect_layout,
    from_pytorch,
    from_upstream_mlx,
)
from .quantize import (
    CACHE_BITS,
    DEFAULT_GROUP_SIZE,
    QuantizationError,
    QuantizationPolicy,
    apply_quantization,
    cache_record,
    default_caches,
    describe,
    infer_quantization,
    quantization_config,
    quantize_weights,
    read_cache_record,
    same_quantization,
)

CHECKPOINT_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
_MAX_LISTED = 8


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path | None]:
    """(weights file, config.json or None) for a file or a directory."""
    path = Path(path).expanduser()
    if path.is_dir():
        weights = path / CHECKPOINT_NAME
        if not weights.exists():
            found = sorted(p.name for p in path.glob("*.safetensors"))
            hint = f" (found: {', '.join(found)}; pass the file itself)" if found else ""
            raise CheckpointError(path, f"directory has no {CHECKPOINT_NAME}{hint}")
        config = path / CONFIG_NAME
    elif path.exists():
        weights, config = path, path.parent / CONFIG_NAME
    else:
        raise CheckpointError(path, "no such file or directory")
    return weights, (config if config.exists() else None)


def read_config(config_path: Path | None) -> ModelConfig:
    if config_path is None:
        return moshika_vis()
    try:
        return ModelConfig.from_dict(json.loads(config_path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(config_path, f"invalid model config ({e})") from None


def _describe(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def to_native(weights: dict[str, mx.array], cfg: ModelConfig, path: Path) -> dict[str, mx.array]:
    """Any supported layout -> this project's tensor names, or a CheckpointError."""
    layout = detect_layout(weights)
    if layout == LAYOUT_NATIVE:
        return weights
    convert = {LAYOUT_PYTORCH: from_pytorch, LAYOUT_UPSTREAM_MLX: from_upstream_mlx}.get(layout)
    if convert is None:
        raise CheckpointError(
            path,
            f"not a MoshiVis checkpoint: none of its {len(weights)} tensors looks like MoshiVis "
            f"(first: {_describe(sorted(weights))})",
        )
    weights = dict(weights)
    try:
        native, missing = convert(weights, cfg)
    except LayoutError as e:
        raise CheckpointError(path, str(e)) from None
    if missing:
        raise CheckpointError(path, f"missing {len(missing)} tensor(s): {_describe(missing)}")
    if weights:
        raise CheckpointError(path, f"unexpected tensor(s) for this model: {_describe(sorted(weights))}")
    return native


def check_against_model(model: MoshiVis, weights: dict[str, mx.array], path: Path) -> None:
    """Every parameter filled, nothing left over, every shape right."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    common = sorted(set(expected) & set(weights))
    wrong = [
        f"{name} {tuple(weights[name].shape)} (model expects {tuple(expected[name].shape)})"
        for name in common
        if tuple(weights[name].shape) != tuple(expected[name].shape)
    ]
    kind = [  # e.g. a packed uint32 weight where the model has a float one
        f"{name} is {weights[name].dtype}, the model expects {'a float' if is_float else 'an integer'} tensor"
        for name in common
        if (is_float := mx.issubdtype(expected[name].dtype, mx.floating)) != mx.issubdtype(weights[name].dtype, mx.floating)
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected tensor(s): {_describe(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) of the wrong shape: {_describe(wrong)}")
    if kind:
        problems.append(f"{len(kind)} tensor(s) of the wrong type: {_describe(kind)}")
    if problems:
        raise CheckpointError(path, "; ".join(problems))


@contextmanager
def _size_hint(has_config: bool):
    """Say that default sizes were assumed when a checkpoint without config does not fit them."""
    try:
        yield
    except CheckpointError as e:
        if has_config:
            raise
        hint = f"no {CONFIG_NAME} next to it, so the released 'moshika-vis' sizes were assumed"
        raise CheckpointError(e.path, f"{e.problem}; {hint}") from None


@dataclass
class OpenedCheckpoint:
    """A checkpoint read lazily (no tensor data yet) and renamed to our layout."""

    weights_path: Path
    cfg: ModelConfig
    layout: str
    weights: dict[str, mx.array]  # our names, lazy
    quantization: dict | None  # as stored: from config.json, checked against the tensor shapes
    has_config: bool
    caches: dict | None = None  # config.json's cache_quantization record, if any


def open_checkpoint(path: str | Path, config: ModelConfig | None = None) -> OpenedCheckpoint:
    """Read a checkpoint's header and config; no tensor data is read."""
    weights_path, config_path = resolve_checkpoint(path)
    cfg = config or read_config(config_path)
    raw = load_safetensors(weights_path)
    layout = detect_layout(raw)
    with _size_hint(config is not None or config_path is not None):
        weights = to_native(raw, cfg, weights_path)
    stored = caches = None
    if config_path is not None and layout == LAYOUT_NATIVE:
        try:
            record = json.loads(config_path.read_text())
            stored = record.get("quantization")
            caches = read_cache_record(record.get("cache_quantization"), str(config_path))
        except (json.JSONDecodeError, AttributeError) as e:
            raise CheckpointError(config_path, f"invalid model config ({e})") from None
        except QuantizationError as e:
            raise CheckpointError(config_path, str(e)) from None
    skeleton = MoshiVis(cfg)  # lazy: its random init is never evaluated
    with _size_hint(config is not None or config_path is not None):
        try:
            inferred = infer_quantization(weights, skeleton, str(weights_path))
        except QuantizationError as e:
            raise CheckpointError(weights_path, str(e)) from None
    if stored is not None and not same_quantization(stored, inferred, skeleton, weights):
        raise CheckpointError(
            weights_path,
            f"its tensors are quantized differently from what {config_path.name} says "
            f"({describe(inferred, skeleton)} vs {describe(stored, skeleton, weights)})",
        )
    return OpenedCheckpoint(
        weights_path=weights_path,
        cfg=cfg,
        layout=layout,
        weights=weights,
        quantization=stored if stored is not None else inferred,
        has_config=config is not None or config_path is not None,
        caches=caches,
    )


AUTO_DTYPE = "auto"


def dtype_from_name(dtype: str) -> mx.Dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES) + [AUTO_DTYPE]}, got {dtype!r}")
    return DTYPES[dtype]


def dtype_name(dtype: "str | mx.Dtype") -> str:
    """"auto", a name of DTYPES, or an mx.Dtype among them -> its name."""
    if isinstance(dtype, mx.Dtype):
        names = [name for name, value in DTYPES.items() if value == dtype]
        if not names:
            raise ValueError(f"dtype must be one of {sorted(DTYPES) + [AUTO_DTYPE]}, got {dtype}")
        return names[0]
    if dtype != AUTO_DTYPE:
        dtype_from_name(dtype)
    return dtype


def resolve_dtype(dtype: str, quantized: bool, path: PlatformPath | None = None) -> str:
    """The compute dtype for `dtype="auto"` on `path` (default: `choose_platform_path()`):
    bf16, except quantized models on the CPU path (see `PlatformPath`).
    Unquantized models keep bf16 everywhere: float32 would double their memory."""
    if dtype != AUTO_DTYPE:
        dtype_from_name(dtype)
        return dtype
    path = path or choose_platform_path()
    return path.quantized_activations if quantized else "bfloat16"


def float32_parts_dtype(requested: str, quantized: bool, path: PlatformPath | None = None) -> str | None:
    """What `dtype="auto"` computes the depformer, the cross-attention and its
    gates of an unquantized model in, if not the model's dtype.

    On the CPU path with an optimized BLAS, float32 (see `MoshiVis.float32_on_cpu_parts`):
    1.7 GB more memory, the full-size depformer ~3x faster. On MLX's bundled
    reference BLAS, float32 products are slower than its bf16 ones (full-size
    step 17.5 s against 12.7 s here), and on a GPU bf16 is the fast path: bf16
    throughout there.
    """
    path = path or choose_platform_path()
    return "float32" if requested == AUTO_DTYPE and not quantized and path.float32_parts else None


def read_model_config(config: "ModelConfig | dict | str | Path | None") -> ModelConfig | None:
    """`load`'s `config`: a ModelConfig, a dict as config.json holds it, or the path of a config.json."""
    if config is None or isinstance(config, ModelConfig):
        return config
    if isinstance(config, dict):
        try:
            return ModelConfig.from_dict(config)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"invalid model config ({e})") from None
    if isinstance(config, (str, Path)):
        path = Path(config).expanduser()
        if path.is_dir():
            path = path / CONFIG_NAME
        if not path.is_file():
            raise CheckpointError(path, "no such config file")
        return read_config(path)
    raise TypeError(f"config must be a ModelConfig, a dict or the path of a config.json, got {type(config).__name__}")


def quantization_request(bits: int | None, group_size: int, policy: QuantizationPolicy | None):
    if policy is not None and bits is not None:
        raise ValueError("pass either bits= or policy=, not both")
    if policy is None and bits is not None:
        policy = QuantizationPolicy.mixed(bits, group_size)
    return policy


AUTO_CACHE = "auto"


def parse_cache_bits(text: str) -> "int | None | str":
    """A command line's `--kv-bits` / `--image-kv-bits`: 4, 5, 6 or 8, "none" (or
    "float", "bf16") for the compute dtype, or "auto" (see `resolve_caches`)."""
    word = text.lower()
    if word in ("none", "float", "bf16"):
        return None
    if word == AUTO_CACHE:
        return AUTO_CACHE
    if word.isdigit() and int(word) in CACHE_BITS:
        return int(word)
    raise argparse.ArgumentTypeError(f"must be one of {', '.join(map(str, CACHE_BITS))}, 'none' or 'auto'")


def resolve_caches(
    ckpt: OpenedCheckpoint,
    policy: QuantizationPolicy | None,
    kv_bits: "int | None | str" = AUTO_CACHE,
    image_kv_bits: "int | None | str" = AUTO_CACHE,
) -> dict | None:
    """How the model's caches are stored: each of `kv_bits` / `image_kv_bits` as
    given, else the policy's (quantizing on load), else what config.json
    records, else the default for the weights' quantization (`default_caches`)."""
    if policy is not None:
        base = policy.caches
    elif ckpt.caches is not None:
        base = ckpt.caches
    else:
        base = default_caches(ckpt.quantization)
    base = base or {"kv_bits": None, "image_kv_bits": None}
    kv = base["kv_bits"] if kv_bits == AUTO_CACHE else kv_bits
    image_kv = base["image_kv_bits"] if image_kv_bits == AUTO_CACHE else image_kv_bits
    for name, bits in (("kv_bits", kv), ("image_kv_bits", image_kv)):
        if bits is not None and bits not in CACHE_BITS:
            raise ValueError(f"{name} must be one of {CACHE_BITS}, None or {AUTO_CACHE!r}, got {bits!r}")
    return cache_record(kv, image_kv)


def prepare(
    ckpt: OpenedCheckpoint, dtype: str, policy: QuantizationPolicy | None
) -> tuple[MoshiVis, dict[str, mx.array], dict | None]:
    """(model with the right layer types, final weights (lazy), quantization config).

    Consumes `ckpt.weights`. An already quantized checkpoint is never quantized
    again: asking for exactly its own quantization is accepted (nothing to do),
    anything else is an error.
    """
    target = dtype_from_name(dtype)
    model = MoshiVis(ckpt.cfg)
    weights = ckpt.weights
    quantization = ckpt.quantization
    if policy is not None:
        requested = quantization_config(model, policy)
        if quantization is None:
            weights = quantize_weights(weights, requested, model)
            quantization = requested
        elif not same_quantization(requested, quantization, model, weights):
            raise CheckpointError(
                ckpt.weights_path,
                f"is already quantized ({describe(quantization, model, weights)}); quantizing it again would "
                "stack two roundings. Load or convert it without bits, or start from the bf16 checkpoint.",
            )
    if quantization is not None:
        apply_quantization(model, quantization, weights)
        use_vision_kernels(model.vision)  # same parameters, fast on the CPU
    with _size_hint(ckpt.has_config):
        check_against_model(model, weights, ckpt.weights_path)
    weights = {k: (v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in weights.items()}
    return model, weights, quantization


def load(
    path: str | Path,
    dtype: "str | mx.Dtype" = AUTO_DTYPE,
    config: "ModelConfig | dict | str | Path | None" = None,
    *,
    bits: int | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
    policy: QuantizationPolicy | None = None,
    kv_bits: "int | None | str" = AUTO_CACHE,
    image_kv_bits: "int | None | str" = AUTO_CACHE,
    lazy: bool = False,
) -> MoshiVis:
    """Load a MoshiVis checkpoint: a file or a directory (model.safetensors + config.json).

    Any released layout is accepted (official PyTorch, upstream MLX bf16/q4/q8,
    this project's). `dtype` is the compute dtype, a name or an mx.Dtype: float
    weights, and the scales of quantized ones, are cast to it; "auto" picks
    bfloat16, or float32 for a quantized model on a CPU (see `resolve_dtype`).
    `config` (default: the config.json next to the weights) is a ModelConfig,
    a dict or the path of a config.json. `bits` quantizes a float
    checkpoint on load with the default mixed policy (see `quantize.py`);
    `policy` gives full control instead. Tensors are read and quantized one at
    a time, so memory never holds the float and the quantized model together.
    `kv_bits` / `image_kv_bits` store the KV window and the image K/V quantized
    (4, 5, 6 or 8) or in the compute dtype (None); "auto" takes the policy's,
    else what config.json records, else 4/8 for a 4-bit checkpoint, 8/8 for an
    8-bit one and float for a float one (see `quantize.QuantizationPolicy.mixed`).
    `lazy=True` checks every name and shape but reads no tensor data.

    The model then runs the path chosen for this device (`cpu.platform_path`,
    recorded as `model.platform_path`): on a CPU, the CPU counterparts of its
    modules, and with "auto" the depformer, the cross-attention and its gates
    of an unquantized model in float32 (see `MoshiVis.float32_on_cpu_parts`).
    """
    dtype = dtype_name(dtype)
    config = read_model_config(config)
    policy = quantization_request(bits, group_size, policy)
    platform = choose_platform_path()
    ckpt = open_checkpoint(path, config)
    quantized = policy is not None or ckpt.quantization is not None
    compute_dtype = resolve_dtype(dtype, quantized, platform)
    caches = resolve_caches(ckpt, policy, kv_bits, image_kv_bits)
    model, weights, _ = prepare(ckpt, compute_dtype, policy)
    if caches is not None:
        model.quantize_caches(caches["kv_bits"], caches["image_kv_bits"], caches["group_size"])
    model.load_weights(list(weights.items()), strict=True)
    del weights
    model.eval()
    if not lazy:
        for _, value in tree_flatten(model.parameters()):
            mx.eval(value)  # one tensor at a time bounds the peak when quantizing on load
    float32_parts = float32_parts_dtype(dtype, quantized, platform) is not None
    return apply_platform_path(model, platform, float32_parts=float32_parts, evaluate=not lazy)
