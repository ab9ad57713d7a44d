"""Released checkpoint -> this project's (optionally quantized) checkpoint directory.

Streaming: tensors are read lazily, renamed, quantized and written one at a
time, so converting the 17 GB bf16 file needs memory for a few of its largest
tensors, not for the model. Atomic: everything is written into a hidden
sibling directory, checked, and only then renamed to the output; on any
failure (bad input, full disk, Ctrl-C) that directory is removed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ...model.config import ModelConfig
from ...model.model import MoshiVis
from ..checkpoint import read_header, safetensors_header, write_safetensors
from ..loading import DTYPES as _DTYPE_NAMES
from ..loading import AUTO_CACHE, CHECKPOINT_NAME, CONFIG_NAME, load, open_checkpoint, prepare, resolve_caches
from ..quantize import QuantizationPolicy, describe, model_quantization

FORMAT = "moshivis-mlx"
MODEL_TYPE = "moshivis"
_METADATA = {"format": "mlx", "producer": "moshivis_mlx convert"}


class ConvertError(RuntimeError):
    """A conversion that cannot or must not go ahead."""


@dataclass
class ConvertResult:
    output_dir: Path
    source_layout: str
    num_tensors: int
    file_bytes: int
    num_params: int  # weights of the unquantized model
    quantization: dict | None
    quantization_summary: str
    caches: dict | None  # the cache_quantization record written
    seconds: float

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.file_bytes / self.num_params


def count_parameters(cfg: ModelConfig) -> int:
    """Weights of the unquantized model (its lazy random init is never evaluated)."""
    return sum(v.size for _, v in tree_flatten(MoshiVis(cfg).parameters()))


def _check_output(output: Path, force: bool) -> None:
    if output.exists() and not output.is_dir():
        raise ConvertError(f"{output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise ConvertError(f"{output} already exists and is not empty; pass --force to replace it")


def _verify(tmp: Path, expected: bytes, dtype: str) -> int:
    """Re-read what was written: header, size, and a strict (data-less) load."""
    weights = tmp / CHECKPOINT_NAME
    written = read_header(weights)
    size = weights.stat().st_size
    header = json.loads(expected[8:])
    header.pop("__metadata__", None)
    if written != header:
        raise ConvertError(f"{weights}: the header read back differs from the one written")
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if size != len(expected) + end:
        raise ConvertError(f"{weights}: {size} bytes on disk, {len(expected) + end} expected")
    load(tmp, dtype=dtype, lazy=True)
    return size


def _install(tmp: Path, output: Path) -> None:
    """Put the finished directory in place; an old output is removed only afterwards."""
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(old)
    tmp.rename(output)
    if old is not None:
        shutil.rmtree(old)


def write_checkpoint(
    output_dir: str | Path,
    cfg: ModelConfig,
    weights: dict[str, mx.array],
    quantization: dict | None,
    *,
    dtype: str,
    caches: dict | None = None,
    force: bool = False,
    on_start=None,
    on_tensor=None,
) -> tuple[Path, int]:
    """Atomically write `weights` (our layout, lazy is fine) and their config; (directory, file size).

    Consumes `weights`. The directory appears only once complete and re-read.
    """
    output = Path(output_dir).expanduser().absolute()
    _check_output(output, force)
    head = safetensors_header(weights, _METADATA)
    total = sum(v.nbytes for v in weights.values())
    config_json = {**cfg.to_dict(), "model_type": MODEL_TYPE, "format": FORMAT}
    if quantization is not None:
        config_json["quantization"] = quantization
    if caches is not None:
        config_json["cache_quantization"] = caches  # how `load` stores the KV window and image K/V
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        (tmp / CONFIG_NAME).write_text(json.dumps(config_json, indent=1) + "\n")
        if on_start is not None:
            on_start(total)
        write_safetensors(tmp / CHECKPOINT_NAME, weights, _METADATA, on_tensor=on_tensor)
        size = _verify(tmp, head, dtype)
        _install(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output, size


def convert_checkpoint(
    source: str | Path,
    output_dir: str | Path,
    *,
    policy: QuantizationPolicy | None = None,
    dtype: str = "bfloat16",
    config: ModelConfig | None = None,
    kv_bits: "int | None | str" = AUTO_CACHE,
    image_kv_bits: "int | None | str" = AUTO_CACHE,
    force: bool = False,
    on_tensor=None,
    on_start=None,
) -> ConvertResult:
    """Convert `source` (any supported layout) into `output_dir`.

    `policy` None keeps the source's weights as they are (float or already
    quantized); otherwise float weights are quantized with it. An already
    quantized source is never quantized a second time: asking for its own
    quantization again is an identity, anything else an error.
    `kv_bits` / `image_kv_bits` are recorded in config.json as the way `load`
    stores the caches ("auto": as `load` would choose them, see `resolve_caches`).
    `on_start(total_bytes)` and `on_tensor(name, nbytes)` report progress.
    """
    started = time.monotonic()
    output = Path(output_dir).expanduser().absolute()
    _check_output(output, force)  # fail before reading anything
    ckpt = open_checkpoint(source, config)
    if output == ckpt.weights_path.absolute().parent or output in ckpt.weights_path.absolute().parents:
        raise ConvertError(f"{output} holds the input {ckpt.weights_path}; write to another directory")
    caches = resolve_caches(ckpt, policy, kv_bits, image_kv_bits)
    model, weights, quantization = prepare(ckpt, dtype, policy)
    summary = describe(quantization, model, weights)
    num_tensors = len(weights)
    del model
    output, size = write_checkpoint(
        output_dir, ckpt.cfg, weights, quantization, dtype=dtype, caches=caches, force=force,
        on_start=on_start, on_tensor=on_tensor,
    )
    return ConvertResult(
        output_dir=output,
        source_layout=ckpt.layout,
        num_tensors=num_tensors,
        file_bytes=size,
        num_params=count_parameters(ckpt.cfg),
        quantization=quantization,
        quantization_summary=summary,
        caches=caches,
        seconds=time.monotonic() - started,
    )


def save_model(model: MoshiVis, output_dir: str | Path, *, force: bool = False) -> Path:
    """Save a loaded (possibly quantized) model as a checkpoint directory that `load` opens."""
    weights = dict(tree_flatten(model.parameters()))
    dtype = next(name for name, d in _DTYPE_NAMES.items() if d == model.dtype)
    output, _ = write_checkpoint(
        output_dir, model.cfg, weights, model_quantization(model), dtype=dtype, caches=model.cache_quantization,
        force=force,
    )
    return output
