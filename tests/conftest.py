"""Shared helpers: the reference fixture and small random models."""

from __future__ import annotations

from moshivis_mlx.cpu.blas import use_optimized_blas

use_optimized_blas()  # before MLX loads, as the CLI does; CI installs OpenBLAS

import dataclasses
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file

import moshivis_mlx as mv
from moshivis_mlx.model.config import NORM_MEAN_SQUARE, NORM_VARIANCE
from moshivis_mlx.cpu.platform_path import CPU, PlatformPath, apply_platform_path, choose_platform_path

# The CPU path without an optimized BLAS's dtypes, for tests of the CPU counterparts themselves.
CPU_PATH = PlatformPath(kind=CPU, blas=None, quantized_activations="float32", float32_parts=False, image_dtype=None)

FIXTURE_A = Path(__file__).parent / "fixtures" / "moshivis_tiny_a"

# Run name prefix in reference.safetensors for each norm setting.
NORM_PREFIX = {NORM_VARIANCE: "", NORM_MEAN_SQUARE: "msnorm."}


@pytest.fixture(scope="session")
def reference() -> dict[str, np.ndarray]:
    return load_file(str(FIXTURE_A / "reference.safetensors"))


def fixture_config(depformer_norm: str = NORM_VARIANCE) -> mv.ModelConfig:
    cfg = mv.ModelConfig.from_dict(json.loads((FIXTURE_A / "config.json").read_text()))
    return dataclasses.replace(cfg, depformer_norm=depformer_norm)


def tiny_config(**overrides) -> mv.ModelConfig:
    """A small random-weight model with few codebooks, for fast structural tests."""
    base = dict(
        dim=32,
        num_layers=2,
        num_heads=2,
        ffn_hidden=48,
        context=6,
        text_card=40,
        audio_card=24,
        num_audio_codebooks=4,
        delays=(0, 0, 1, 0, 1),
        gate_hidden=16,
        xa_start=2,
        depformer=mv.DepformerConfig(dim=16, num_layers=2, num_heads=2, ffn_hidden=24, num_steps=2),
        vision=mv.VisionConfig(width=24, num_layers=1, num_heads=2, mlp_hidden=32, patch_size=14, image_size=28),
    )
    base.update(overrides)
    return mv.ModelConfig(**base)


def random_model(cfg: mv.ModelConfig, seed: int = 0) -> mv.MoshiVis:
    """Random weights scaled so activations stay in a useful range, on the
    platform path `load` would choose (MOSHIVIS_MLX_FORCE_GPU_PATH=1: a GPU's)."""
    mx.random.seed(seed)
    model = mv.MoshiVis(cfg)
    from mlx.utils import tree_flatten, tree_unflatten

    params = []
    for name, value in tree_flatten(model.parameters()):
        if name.endswith("norm1.weight") or "norm" in name.rsplit(".", 2)[-2]:
            value = 1.0 + 0.1 * mx.random.normal(value.shape)
        else:
            value = mx.random.normal(value.shape) * (value.shape[-1] ** -0.5 if value.ndim > 1 else 0.1)
        params.append((name, value))
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    return apply_platform_path(model, choose_platform_path())


# -- talking: the conversation, file-mode and live-mode tests (see talk_support.py) --


@pytest.fixture(scope="session")
def mimi_path() -> Path:
    from talk_support import random_mimi

    return random_mimi()


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> Path:
    from talk_support import train_tokenizer

    return train_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tiny_spm.model")


@pytest.fixture(scope="session")
def talking_model():
    from talk_support import build_model

    return build_model()


@pytest.fixture(scope="session")
def talking_checkpoint(tmp_path_factory, talking_model) -> Path:
    from talk_support import save_checkpoint

    return save_checkpoint(talking_model, tmp_path_factory.mktemp("checkpoint") / "tiny-moshivis")
