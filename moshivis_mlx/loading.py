"""`moshivis_mlx.load`: a checkpoint file or directory -> a ready `MoshiVis`."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .checkpoint import CheckpointError, load_safetensors
from .config import ModelConfig, moshika_vis
from .layouts import (
    LAYOUT_NATIVE,
    LAYOUT_PYTORCH,
    LAYOUT_UPSTREAM_MLX,
    LayoutError,
    detect_layout,
    from_pytorch,
)
from .model import MoshiVis

CHECKPOINT_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
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
    if layout == LAYOUT_PYTORCH:
        weights = dict(weights)
        try:
            native, missing = from_pytorch(weights, cfg)
        except LayoutError as e:
            raise CheckpointError(path, str(e)) from None
        if missing:
            raise CheckpointError(path, f"missing {len(missing)} tensor(s): {_describe(missing)}")
        if weights:
            raise CheckpointError(path, f"unexpected tensor(s) for this model: {_describe(sorted(weights))}")
        return native
    if layout == LAYOUT_NATIVE:
        return weights
    if layout == LAYOUT_UPSTREAM_MLX:
        raise CheckpointError(path, "upstream MLX layout (kyutai/moshika-vis-mlx) is not supported by this loader yet")
    raise CheckpointError(
        path,
        f"not a MoshiVis checkpoint: none of its {len(weights)} tensors looks like MoshiVis "
        f"(first: {_describe(sorted(weights))})",
    )


def check_against_model(model: MoshiVis, weights: dict[str, mx.array], path: Path) -> None:
    """Every parameter filled, nothing left over, every shape right."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [
        f"{name} {tuple(weights[name].shape)} (model expects {tuple(expected[name].shape)})"
        for name in sorted(set(expected) & set(weights))
        if tuple(weights[name].shape) != tuple(expected[name].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected tensor(s): {_describe(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) of the wrong shape: {_describe(wrong)}")
    if problems:
        raise CheckpointError(path, "; ".join(problems))


def load(path: str | Path, dtype: str = "bfloat16", config: ModelConfig | None = None) -> MoshiVis:
    """Load a MoshiVis checkpoint (file, or directory with model.safetensors and config.json).

    `dtype` is the compute dtype; weights are cast to it (bf16 files stay bf16
    by default).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    weights_path, config_path = resolve_checkpoint(path)
    cfg = config or read_config(config_path)
    raw = load_safetensors(weights_path)
    model = MoshiVis(cfg)
    try:
        weights = to_native(raw, cfg, weights_path)
        check_against_model(model, weights, weights_path)
    except CheckpointError as e:
        if config is None and config_path is None:
            hint = f"no {CONFIG_NAME} next to it, so the released 'moshika-vis' sizes were assumed"
            raise CheckpointError(e.path, f"{e.problem}; {hint}") from None
        raise
    target = _DTYPES[dtype]
    weights = {k: (v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    mx.eval(model.parameters())
    return model
