"""The path a model runs: what a GPU runs (plain modules), or their CPU counterparts.

Both are loaded here in one run whatever the environment says; CI also runs the
parity tests a second time under MOSHIVIS_MLX_FORCE_GPU_PATH=1 (see .ci/run).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import moshivis_mlx as mv
from moshivis_mlx.cpu import layers as cpu_layers, model as cpu_model
from moshivis_mlx.cpu.platform_path import CPU, FORCE_GPU_PATH_VARIABLE, GPU, choose_platform_path

from fixture_a import FIXTURE_A, TOLERANCE, fixture_config, logit_errors, teacher_forced

CPU_MODULES = (cpu_layers.CpuLinear, cpu_layers.CpuQuantizedLinear, cpu_model.CpuTemporalTransformer,
               cpu_model.CpuTemporalLayer, cpu_model.CpuSelfAttention, cpu_model.CpuSharedCrossAttention,
               cpu_model.CpuDepformer, cpu_model.CpuDepformerAttention, cpu_model.CpuVisionQuantizedLinear)


def cpu_modules(model: nn.Module) -> list[str]:
    return sorted({type(m).__name__ for m in model.modules() if isinstance(m, CPU_MODULES)})


def load(monkeypatch, gpu_path: bool, **kwargs) -> mv.MoshiVis:
    if gpu_path:
        monkeypatch.setenv(FORCE_GPU_PATH_VARIABLE, "1")
    else:
        monkeypatch.delenv(FORCE_GPU_PATH_VARIABLE, raising=False)
    return mv.load(FIXTURE_A, config=fixture_config(), **kwargs)


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the CPU path exists on a CPU only")
def test_forcing_the_gpu_path_on_a_cpu_loads_only_plain_modules(monkeypatch):
    cpu = load(monkeypatch, gpu_path=False, dtype="float32")
    assert cpu.platform_path.kind == CPU and not cpu.platform_path.forced
    assert {"CpuLinear", "CpuTemporalTransformer", "CpuDepformer", "CpuSelfAttention"} <= set(cpu_modules(cpu))
    gpu = load(monkeypatch, gpu_path=True, dtype="float32")
    assert gpu.platform_path.kind == GPU and gpu.platform_path.forced
    assert "forced" in gpu.platform_path.describe()
    assert cpu_modules(gpu) == []
    assert type(gpu.text_linear) is nn.Linear and type(gpu.transformer.layers[0].self_attn.in_proj) is nn.Linear


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the CPU path exists on a CPU only")
def test_both_paths_compute_the_same_float32_logits(monkeypatch):
    """The CPU counterparts change how, not what: float32 rounding apart, the same logits."""
    cpu_text, cpu_audio = teacher_forced(load(monkeypatch, gpu_path=False, dtype="float32"))
    gpu_text, gpu_audio = teacher_forced(load(monkeypatch, gpu_path=True, dtype="float32"))
    np.testing.assert_allclose(cpu_text, gpu_text, rtol=0, atol=1e-4)
    np.testing.assert_allclose(cpu_audio, gpu_audio, rtol=0, atol=1e-4)


def test_a_4bit_model_computes_in_bf16_as_a_mac_loads_it(monkeypatch):
    """On the GPU path dtype="auto" keeps bf16 activations and scales for quantized weights."""
    model = load(monkeypatch, gpu_path=True, bits=4)
    assert model.platform_path.kind == GPU and model.dtype == mx.bfloat16
    linear = model.transformer.layers[0].gating.linear_in
    assert type(linear) is nn.QuantizedLinear and linear.scales.dtype == mx.bfloat16
    text_err, audio_err = logit_errors(model)
    assert text_err < TOLERANCE["q4"][0] and audio_err < TOLERANCE["q4"][1]


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the CPU path exists on a CPU only")
def test_the_cpu_path_computes_quantized_models_in_float32(monkeypatch):
    model = load(monkeypatch, gpu_path=False, bits=4)
    assert model.platform_path == choose_platform_path() and model.dtype == mx.float32
    assert type(model.transformer.layers[0].gating.linear_in) is cpu_layers.CpuQuantizedLinear


def test_a_model_that_was_never_loaded_runs_the_gpu_path():
    model = mv.MoshiVis(fixture_config())
    assert model.platform_path.kind == GPU and cpu_modules(model) == []
