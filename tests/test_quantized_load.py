"""`moshivis_mlx.load` on the upstream MLX files and with quantization on load.

Logit comparisons are teacher-forced against the official float32 run of
fixture A (tests/fixtures/README.md tolerances: bf16 0.15 / 1.0, q8 0.5 / 3.0,
q4 3.0 / 15 for text / audio). Quantized models are also compared in float32
compute, which isolates the quantization error from bf16 rounding.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import moshivis_mlx as mv
from moshivis_mlx.weights.checkpoint import CheckpointError
from moshivis_mlx.weights.layouts import LayoutError, from_upstream_mlx
from moshivis_mlx.weights.loading import prepare, to_native
from moshivis_mlx.cpu.platform_path import CPU, choose_platform_path
from moshivis_mlx.weights.quantize import QuantizationError, QuantizationPolicy, fit_group_size, quantization_config

from fixture_a import FIXTURE_A, TOLERANCE, UPSTREAM, UPSTREAM_FILES, assert_same_params, fixture_config, logit_errors

MANIFESTS = Path(__file__).parent / "fixtures" / "manifests"
UPSTREAM_QUANTIZATION = {"q8": (8, 64), "q4": (4, 32)}  # what kyuteye_mlx wrote (fixtures/README.md)


@pytest.fixture(scope="module")
def cfg() -> mv.ModelConfig:
    return fixture_config()


@pytest.fixture(scope="module")
def pytorch_bf16(cfg):
    return mv.load(FIXTURE_A, config=cfg)


def test_upstream_bf16_equals_pytorch_file(cfg, pytorch_bf16):
    assert_same_params(mv.load(UPSTREAM / UPSTREAM_FILES["bf16"], config=cfg), pytorch_bf16)


@pytest.mark.parametrize("name", ["q8", "q4"])
def test_upstream_quantized_layers_read_from_shapes(cfg, name):
    model = mv.load(UPSTREAM / UPSTREAM_FILES[name], config=cfg)
    bits, group = UPSTREAM_QUANTIZATION[name]
    quantized = [m for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    # kyuteye_mlx quantizes every Linear/Embedding of the language model, SigLIP none.
    per_step = 2 + 4 * cfg.depformer.num_layers  # emb, linear_out, 4 linears per layer
    assert len(quantized) == 2 + cfg.num_audio_codebooks + 6 * cfg.num_layers + 3 + 1 + 1 + 8 * per_step
    assert {(m.bits, m.group_size) for m in quantized} == {(bits, group)}
    assert isinstance(model.depformer.input_proj, nn.QuantizedLinear)  # 8 slices fused exactly
    assert isinstance(model.vision.encoder.layers[0].mlp.fc1, nn.Linear)


@pytest.mark.parametrize("name", ["q8", "q4"])
def test_uniform_policy_reproduces_upstream_files_bit_for_bit(cfg, name):
    """Quantizing the PyTorch file our way with upstream's settings gives upstream's tensors."""
    bits, group = UPSTREAM_QUANTIZATION[name]
    ours = mv.load(FIXTURE_A, config=cfg, policy=QuantizationPolicy.uniform(bits, group))
    assert_same_params(ours, mv.load(UPSTREAM / UPSTREAM_FILES[name], config=cfg))


@pytest.mark.parametrize("name", ["bf16", "q8", "q4"])
def test_upstream_files_teacher_forced_within_tolerance(cfg, name):
    text_err, audio_err = logit_errors(mv.load(UPSTREAM / UPSTREAM_FILES[name], config=cfg))
    text_tol, audio_tol = TOLERANCE[name]
    assert text_err < text_tol and audio_err < audio_tol, (text_err, audio_err)


@pytest.mark.parametrize("bits", [8, 4])
def test_our_quantization_at_least_as_close_as_upstream(cfg, bits):
    """Default mixed policy, group 64, float32 compute: no worse than kyuteye_mlx's files."""
    name = f"q{bits}"
    ours = logit_errors(mv.load(FIXTURE_A, dtype="float32", config=cfg, bits=bits))
    upstream = logit_errors(mv.load(UPSTREAM / UPSTREAM_FILES[name], dtype="float32", config=cfg))
    assert ours[0] <= upstream[0] and ours[1] <= upstream[1], (ours, upstream)
    text_tol, audio_tol = TOLERANCE[name]
    assert ours[0] < text_tol and ours[1] < audio_tol
    if bits == 4:  # 8-bit heads and depformer: far closer than upstream's uniform 4 bits
        assert ours[0] < upstream[0] / 2 and ours[1] < upstream[1] / 2, (ours, upstream)


def test_every_bit_width_runs_and_error_shrinks_with_bits(cfg):
    errors = [logit_errors(mv.load(FIXTURE_A, dtype="float32", config=cfg, bits=b))[0] for b in (2, 3, 4, 5, 6, 8)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < TOLERANCE["q8"][0] and errors[2] < TOLERANCE["q4"][0]


def test_config_that_contradicts_the_tensors_is_refused(cfg, tmp_path):
    from moshivis_mlx.weights.convert.converter import convert_checkpoint

    convert_checkpoint(FIXTURE_A, tmp_path / "q4", policy=QuantizationPolicy.mixed(4))
    config_path = tmp_path / "q4" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization"]["text_linear"] = False
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="quantized differently"):
        mv.load(tmp_path / "q4")


def test_quantize_on_load_follows_the_mixed_policy(cfg):
    model = mv.load(FIXTURE_A, config=cfg, bits=4, dtype="bfloat16")
    body = model.transformer.layers[0]
    for layer in (body.self_attn.in_proj, body.gating.linear_out, body.cross_gate.linear_in):
        assert isinstance(layer, nn.QuantizedLinear) and (layer.bits, layer.group_size) == (4, 64)
    for layer in (model.text_emb, model.audio_embs[3], model.text_linear, model.transformer.cross_attention.kv_proj,
                  model.depformer.input_proj, model.depformer.steps[2].layers[1].gating.linear_in,
                  model.depformer.steps[0].emb, model.depformer.steps[7].linear_out):
        assert isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and layer.bits == 8, layer
    assert type(model.image_prefix.proj_xa) is nn.Linear
    assert type(model.vision.encoder.layers[0].self_attn.q_proj) is nn.Linear
    assert model.out_norm.weight.dtype == mx.bfloat16


def test_float32_compute_with_quantized_weights(cfg):
    model = mv.load(UPSTREAM / UPSTREAM_FILES["q4"], dtype="float32", config=cfg)
    layer = model.transformer.layers[1].self_attn.out_proj
    assert layer.weight.dtype == mx.uint32 and layer.scales.dtype == mx.float32 and layer.biases.dtype == mx.float32
    assert model.dtype == mx.float32


def test_group_size_falls_back_where_the_width_does_not_divide(cfg):
    # The tiny depformer is 64 wide: group 128 cannot apply there, 64 can.
    model = mv.load(FIXTURE_A, config=cfg, bits=4, group_size=128)
    assert model.transformer.layers[0].self_attn.in_proj.group_size == 128
    assert model.depformer.steps[0].layers[0].self_attn.in_proj.group_size == 64
    assert fit_group_size(48, 64) is None and fit_group_size(4304, 128) is None  # SigLIP fc2: 4304 = 16 * 269
    assert fit_group_size(96, 128) == 32


def test_vision_is_quantized_only_when_asked(cfg):
    model = mv.load(FIXTURE_A, config=cfg, policy=QuantizationPolicy.mixed(4, vision_bits=8))
    assert isinstance(model.vision.encoder.layers[1].mlp.fc2, nn.QuantizedLinear)
    # The position embedding is read as a matrix: never quantized.
    assert type(model.vision.embeddings.position_embedding) is nn.Embedding
    features = model.vision(mx.zeros((1, cfg.vision.image_size, cfg.vision.image_size, 3)))
    assert features.shape == (1, cfg.vision.num_tokens, cfg.vision.width)


def test_already_quantized_checkpoint_is_not_quantized_again(cfg):
    q4 = UPSTREAM / UPSTREAM_FILES["q4"]
    with pytest.raises(CheckpointError, match="already quantized"):
        mv.load(q4, config=cfg, bits=8)
    # Asking for exactly what is stored is an identity.
    same = mv.load(q4, config=cfg, policy=QuantizationPolicy.uniform(4, 32))
    assert_same_params(same, mv.load(q4, config=cfg))


def test_policy_rejects_unsupported_bits_and_groups():
    with pytest.raises(QuantizationError, match="bits"):
        QuantizationPolicy.mixed(7)
    with pytest.raises(QuantizationError, match="group_size"):
        QuantizationPolicy.mixed(4, 48)


def test_depformer_norm_copies_must_agree(cfg):
    weights = dict(mx.load(str(UPSTREAM / UPSTREAM_FILES["bf16"])))
    name = "depformer.slices.3.transformer.layers.2.norm1.weight"
    weights[name] = weights[name] * 2
    with pytest.raises(LayoutError, match="differ between slices"):
        from_upstream_mlx(weights, cfg)


def test_upstream_duplicate_cross_attention_copies_are_dropped(cfg):
    weights = dict(mx.load(str(UPSTREAM / UPSTREAM_FILES["q4"])))
    assert "transformer.layers.1.cross_attention.mha.q_proj.weight" in weights
    native, missing = from_upstream_mlx(weights, cfg)
    assert not missing and not weights  # everything consumed, copies included
    assert not any("cross_attention.mha" in n for n in native)


def _lazy_manifest_weights(name: str, file: str) -> dict[str, mx.array]:
    """Full-size tensors of a released file as lazy zeros: names and shapes only, no memory."""
    manifest = json.loads(gzip.open(MANIFESTS / f"{name}.json.gz", "rt").read())
    dtypes = {"BF16": mx.bfloat16, "U32": mx.uint32}
    return {n: mx.zeros(shape, dtypes[dtype]) for n, (shape, dtype) in manifest["files"][file].items()}


@pytest.mark.parametrize(
    "name, file, bits",
    [
        ("moshika-vis-pytorch", "model.safetensors", None),
        ("moshika-vis-mlx", "model.safetensors", None),
        ("moshika-vis-mlx", "model.q8.safetensors", 8),
        ("moshika-vis-mlx", "model.q4.safetensors", 4),
    ],
)
def test_full_size_released_layouts_map_onto_the_model(name, file, bits):
    """Every tensor of the real releases (from their manifests) lands on a parameter of the right shape."""
    cfg = mv.moshika_vis()
    native = to_native(_lazy_manifest_weights(name, file), cfg, Path(file))
    from moshivis_mlx.weights.loading import OpenedCheckpoint
    from moshivis_mlx.weights.quantize import infer_quantization

    quantization = infer_quantization(native, mv.MoshiVis(cfg), file)
    assert (quantization or {}).get("bits") == bits
    ckpt = OpenedCheckpoint(Path(file), cfg, "", native, quantization, has_config=True)
    model, weights, _ = prepare(ckpt, "bfloat16", None)  # raises on any missing/extra/mis-shaped tensor
    model.load_weights(list(weights.items()), strict=True)


def test_full_size_mixed_q4_size():
    """Bits per weight of the default 4-bit policy on the real model (lazy, nothing computed)."""
    cfg = mv.moshika_vis()
    model = mv.MoshiVis(cfg)
    config = quantization_config(model, QuantizationPolicy.mixed(4))
    total_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    nn.quantize(model, class_predicate=lambda p, m: config.get(p) or False)
    stored = [v for _, v in tree_flatten(model.parameters())]
    total_bytes = sum(v.nbytes if v.dtype == mx.uint32 else 2 * v.size for v in stored)  # floats stored as bf16
    bpw = 8 * total_bytes / total_params
    assert total_params == 8_307_240_688  # the released PyTorch file's count (manifest)
    # Body at 4.5 (4 bits + bf16 scale and bias per 64), ~15 % at 8.5, SigLIP (5 %) at 16.
    assert 5.5 < bpw < 5.8, bpw


def test_auto_dtype_is_float32_for_quantized_models_on_cpu_only():
    """Per-backend compute dtype: quantized matmuls on the CPU are ~9x faster in float32."""
    import mlx.core as mx

    from moshivis_mlx.weights.loading import resolve_dtype

    on_cpu = choose_platform_path().kind == CPU  # not under MOSHIVIS_MLX_FORCE_GPU_PATH=1
    assert resolve_dtype("auto", quantized=True) == ("float32" if on_cpu else "bfloat16")
    assert resolve_dtype("auto", quantized=False) == "bfloat16"
    assert resolve_dtype("float16", quantized=True) == "float16"
    quantized = mv.load(FIXTURE_A, bits=8)
    assert quantized.dtype == (mx.float32 if on_cpu else mx.bfloat16)
    assert mv.load(FIXTURE_A).dtype == mx.bfloat16


FLOAT32_ON_CPU = ("depformer.", "transformer.cross_attention.", ".cross_gate.")


def test_auto_dtype_computes_the_depformer_and_cross_attention_in_float32_on_cpu_only():
    """MLX's CPU bf16 matmul is ~4x slower than float32 through an optimized BLAS; the
    depformer, the shared cross-attention and its gates are small enough to pay for it."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    on_cpu = choose_platform_path().float32_parts  # a CPU with a fast BLAS: see the next test
    auto = mv.load(FIXTURE_A)
    params = tree_flatten(auto.parameters())
    upcast = {v.dtype for k, v in params if any(part in k for part in FLOAT32_ON_CPU)}
    rest = {v.dtype for k, v in params if not any(part in k for part in FLOAT32_ON_CPU)}
    assert upcast == ({mx.float32} if on_cpu else {mx.bfloat16})
    assert rest == {mx.bfloat16}
    assert any(".cross_gate." in k for k, _ in params) and any("transformer.layers.0.self_attn" in k for k, _ in params)
    kv = auto.embed_image(np.zeros((auto.cfg.vision.num_tokens, auto.cfg.vision.width), np.float32))
    assert kv.keys.dtype == kv.values.dtype == (mx.float32 if on_cpu else mx.bfloat16)  # read as the xa computes
    explicit = mv.load(FIXTURE_A, dtype="bfloat16")
    assert {v.dtype for _, v in tree_flatten(explicit.depformer.parameters())} == {mx.bfloat16}
    quantized = mv.load(FIXTURE_A, bits=8)  # already computes in float32 on a CPU
    assert quantized.depformer.steps[0].linear_out.scales.dtype == quantized.dtype


@pytest.mark.skipif(sys.platform != "linux", reason="MLX's Linux wheel only")
def test_on_the_bundled_reference_blas_auto_keeps_every_part_bf16():
    """Through MLX's reference BLAS, float32 products are slower than its bf16 ones."""
    import os
    import subprocess

    code = (
        "from moshivis_mlx.cpu.blas import use_optimized_blas; use_optimized_blas(); "
        "import moshivis_mlx as mv, mlx.core as mx; from mlx.utils import tree_flatten; "
        f"m = mv.load({str(FIXTURE_A)!r}); "
        "print(sorted({str(v.dtype) for _, v in tree_flatten(m.depformer.parameters())}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env["MOSHIVIS_MLX_BLAS"] = "bundled"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['mlx.core.bfloat16']"
