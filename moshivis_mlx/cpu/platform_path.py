"""Which path a loaded model runs: what a GPU runs, or its CPU counterparts.

The model's modules are written as a GPU runs them. On a CPU, `load` applies
`apply_platform_path` once after loading: it swaps modules for their CPU
counterparts (`cpu.model`) and sets the CPU compute dtypes, all chosen here
from the device and the BLAS, and records the choice on the model
(`model.platform_path`). Nothing of it happens on a GPU.

`MOSHIVIS_MLX_FORCE_GPU_PATH=1` makes a CPU load and run exactly what a GPU
would get (slowly): how the tests check the path a Mac runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

FORCE_GPU_PATH_VARIABLE = "MOSHIVIS_MLX_FORCE_GPU_PATH"
GPU, CPU = "gpu", "cpu"


@dataclass(frozen=True)
class PlatformPath:
    """What a model runs, and in which dtypes `load(dtype="auto")` computes."""

    kind: Literal["gpu", "cpu"]
    blas: str | None  # the optimized BLAS that MLX's float32 CPU products reach; None: none, or a GPU
    quantized_activations: str  # what dtype="auto" computes a quantized model in
    float32_parts: bool  # dtype="auto" computes the depformer, cross-attention and gates of a float model in float32
    image_dtype: str | None  # what SigLIP and the image projection compute in; None: the weights' dtype
    forced: bool = False  # the GPU path on a CPU, through MOSHIVIS_MLX_FORCE_GPU_PATH

    def describe(self) -> str:
        """One line for people (and `doctor`)."""
        parts = [f"{self.kind} path" + (f" (forced by {FORCE_GPU_PATH_VARIABLE})" if self.forced else "")]
        if self.kind == CPU:
            parts.append(f"BLAS {self.blas or 'bundled reference'}")
        parts.append(f"quantized models compute in {self.quantized_activations}")
        if self.float32_parts:
            parts.append("float models' depformer and cross-attention in float32")
        if self.image_dtype:
            parts.append(f"images in {self.image_dtype}")
        return ", ".join(parts)


GPU_PATH = PlatformPath(kind=GPU, blas=None, quantized_activations="bfloat16", float32_parts=False, image_dtype=None)


def gpu_path_forced() -> bool:
    return os.environ.get(FORCE_GPU_PATH_VARIABLE, "").strip() not in ("", "0")


def choose_platform_path() -> PlatformPath:
    """The path for MLX's default device, the BLAS in use and the environment.

    On a CPU: quantized models compute in float32 (MLX's CPU quantized matmul
    is ~9x faster with float32 activations and scales than with bf16). With an
    optimized BLAS, float32 products run ~10x faster than MLX's own bf16 ones,
    so the parts a step reads little of (depformer, cross-attention, gates) and
    the once-per-image work (SigLIP, image K/V) compute in float32; on MLX's
    bundled reference BLAS float32 is slower than bf16, so they do not.
    """
    if mx.default_device() != mx.cpu:
        return GPU_PATH
    if gpu_path_forced():
        return PlatformPath(GPU, None, "bfloat16", False, None, forced=True)
    from .blas import status

    blas = status()
    fast_float32 = blas.optimized
    return PlatformPath(
        kind=CPU,
        blas=blas.library or ("Accelerate" if fast_float32 else None),
        quantized_activations="float32",
        float32_parts=fast_float32,
        image_dtype="float32" if fast_float32 else None,
    )


def apply_platform_path(
    model: nn.Module, path: PlatformPath, *, float32_parts: bool = False, evaluate: bool = True
) -> nn.Module:
    """Set `model` (a MoshiVis, weights loaded) on `path`; returns it, changed in place.

    On the CPU path: modules become their CPU counterparts, the float32 parts
    are upcast when `float32_parts` (a float model loaded with dtype="auto"),
    and the linear layers keep their transposed weights and row blocks, made
    and evaluated here once (`evaluate=False`, for a lazy load: made on the fly).
    """
    from .layers import keep_transposed_weights
    from .model import VISION_COUNTERPARTS, to_cpu_counterparts

    model.platform_path = path
    if path.kind != CPU:
        return model
    model.transformer = to_cpu_counterparts(model.transformer)
    model.depformer = to_cpu_counterparts(model.depformer)
    model.text_linear = to_cpu_counterparts(model.text_linear)
    model.vision = to_cpu_counterparts(model.vision, VISION_COUNTERPARTS)
    if float32_parts:
        for part in model.float32_on_cpu_parts():
            part.set_dtype(mx.float32)
            if evaluate:
                for _, value in tree_flatten(part.parameters()):
                    mx.eval(value)  # one at a time: each bf16 tensor goes as its float32 copy comes
    if evaluate:
        keep_transposed_weights(model)
    return model
