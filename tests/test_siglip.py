"""The SigLIP tower, the image projection and the image K/V, against the official
PyTorch outputs of fixture A and against `transformers.SiglipVisionModel`."""

from __future__ import annotations

import dataclasses


import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

import moshivis_mlx
from moshivis_mlx.model.config import NORM_MEAN_SQUARE, VisionConfig
from moshivis_mlx.cpu.model import CpuVisionQuantizedLinear
from moshivis_mlx.model.image import normalize
from moshivis_mlx.weights.layouts import LayoutError, vision_from_hf
from moshivis_mlx.cpu.platform_path import choose_platform_path
from moshivis_mlx.weights.quantize import QuantizationPolicy
from moshivis_mlx.model.bicubic import bicubic_matrix
from moshivis_mlx.model.siglip import SiglipVisionTower, VisionQuantizedLinear, gelu_tanh, quantize_vision_tower

from conftest import CPU_PATH, FIXTURE_A as FIXTURE, fixture_config
ATOL_F32 = 1e-4  # float32 against float32: rounding only (observed ~3e-6)


@pytest.fixture(scope="module")
def model_f32():
    return moshivis_mlx.load(FIXTURE, dtype="float32")


@pytest.fixture(scope="module")
def model_msnorm_f32():
    return moshivis_mlx.load(FIXTURE, dtype="float32", config=fixture_config(NORM_MEAN_SQUARE))


def kv_rows(kv) -> tuple[np.ndarray, np.ndarray]:
    """ImageKV (1, H, N, hd) -> (N, H * hd) like the reference's xa_k / xa_v."""

    def rows(t: mx.array) -> np.ndarray:
        _, h, n, d = t.shape
        return np.array(t[0].transpose(1, 0, 2).reshape(n, h * d))

    return rows(kv.keys), rows(kv.values)


# -- fixture A: official PyTorch outputs ------------------------------------


def test_normalisation_matches_official(reference):
    ours = normalize(reference["image.pixels"]).transpose(2, 0, 1)
    np.testing.assert_allclose(ours, reference["image.normalized"], rtol=0, atol=1e-7)


def test_encoder_matches_official(model_f32, reference):
    out = np.array(model_f32.encode_image(reference["image.pixels"]))
    np.testing.assert_allclose(out, reference["image.encoder_out"], rtol=0, atol=ATOL_F32)


def test_embeddings_and_kv_match_official(model_f32, reference):
    kv = model_f32.embed_image(reference["image.pixels"])
    features = mx.array(reference["image.encoder_out"])
    embeddings = np.array(model_f32.image_prefix(features))
    np.testing.assert_allclose(embeddings, reference["image.embeddings"], rtol=0, atol=ATOL_F32)
    keys, values = kv_rows(kv)
    np.testing.assert_allclose(keys, reference["image.xa_k"], rtol=0, atol=ATOL_F32)
    np.testing.assert_allclose(values, reference["image.xa_v"], rtol=0, atol=ATOL_F32)


def test_bf16_model_projects_the_image_in_float32_on_a_fast_cpu(reference):
    """The K/V of one image cost ~80 GFLOP at full size: 20 s through MLX's CPU bf16 matmul, 1 s in
    float32 through BLAS. They are computed in float32 there and stored in the model's dtype."""
    model = moshivis_mlx.load(FIXTURE, dtype="bfloat16")
    features = reference["image.encoder_out"]
    kv = model.embed_image(features)
    assert kv.keys.dtype == kv.values.dtype == mx.bfloat16
    keys, values = (rows.astype(np.float32) for rows in kv_rows_f32(kv))
    expected = choose_platform_path().image_dtype or "bfloat16"  # float32 on a CPU with a fast BLAS
    assert model.platform_path.image_dtype == choose_platform_path().image_dtype
    assert model._image_kv_compute_dtype() == getattr(mx, expected)
    # Weights are bf16 either way; computing in float32 leaves only the final rounding to bf16.
    scale = np.abs(reference["image.xa_k"]).max()
    assert np.abs(keys - reference["image.xa_k"]).max() < 0.05 * scale
    assert np.abs(values - reference["image.xa_v"]).max() < 0.05 * np.abs(reference["image.xa_v"]).max()


def kv_rows_f32(kv):
    return kv_rows(type(kv)(kv.keys.astype(mx.float32), kv.values.astype(mx.float32)))


def test_mean_square_variant_matches_official(model_msnorm_f32, reference):
    kv = model_msnorm_f32.embed_image(reference["image.pixels"])
    embeddings = np.array(model_msnorm_f32.image_prefix(mx.array(reference["image.encoder_out"])))
    np.testing.assert_allclose(embeddings, reference["msnorm.image.embeddings"], rtol=0, atol=ATOL_F32)
    keys, values = kv_rows(kv)
    np.testing.assert_allclose(keys, reference["msnorm.image.xa_k"], rtol=0, atol=ATOL_F32)
    np.testing.assert_allclose(values, reference["msnorm.image.xa_v"], rtol=0, atol=ATOL_F32)
    # The two norm settings really differ, so the two tests above are not one test.
    assert np.abs(reference["msnorm.image.embeddings"] - reference["image.embeddings"]).max() > 1e-2


def test_features_input_equals_pixels_input(model_f32, reference):
    from_pixels = model_f32.embed_image(reference["image.pixels"])
    from_features = model_f32.embed_image(reference["image.encoder_out"])
    np.testing.assert_allclose(np.array(from_pixels.keys), np.array(from_features.keys), rtol=0, atol=ATOL_F32)


# -- transformers.SiglipVisionModel, random weights -------------------------

HF_CONFIG = dict(
    hidden_size=96,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=4,
    patch_size=7,
    image_size=42,  # 6 x 6 grid of position embeddings
    layer_norm_eps=1e-6,
    hidden_act="gelu_pytorch_tanh",
    vision_use_head=False,
)


def _vision_config() -> VisionConfig:
    c = HF_CONFIG
    return VisionConfig(
        width=c["hidden_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"],
        mlp_hidden=c["intermediate_size"],
        patch_size=c["patch_size"],
        image_size=c["image_size"],
        layer_norm_eps=c["layer_norm_eps"],
    )


@pytest.fixture(scope="module")
def hf_pair() -> tuple[SiglipVisionModel, SiglipVisionTower]:
    torch.manual_seed(0)
    hf = SiglipVisionModel(SiglipVisionConfig(**HF_CONFIG, attn_implementation="eager")).eval()
    with torch.no_grad():  # HF initialises biases to 0 and norms to 1: make every weight matter
        for name, p in hf.named_parameters():
            if "layer_norm" in name or "layernorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    state = {k: mx.array(v.numpy()) for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
    # transformers 4.x nests the tower under `vision_model.`; 5.x does not.
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in state) else ""
    weights = vision_from_hf(state, prefix, _vision_config(), out_prefix="")
    assert not state, f"left over: {sorted(state)}"
    ours = SiglipVisionTower(_vision_config())
    ours.load_weights(list(weights.items()), strict=True)
    return hf, ours


@pytest.mark.parametrize(
    "height, width",
    [
        (42, 42),  # native: the position table as is
        (70, 70),  # 10 x 10 grid: interpolated, as 448 -> 512 for the release
        (77, 56),  # non-square, 11 x 8
        (45, 47),  # not a multiple of the patch: the conv drops the rest
    ],
)
def test_tower_matches_transformers(hf_pair, height, width):
    hf, ours = hf_pair
    pixels = np.random.default_rng(height * width).uniform(-1, 1, (1, 3, height, width)).astype(np.float32)
    with torch.no_grad():
        expected = hf(torch.from_numpy(pixels), interpolate_pos_encoding=True).last_hidden_state.numpy()
    got = np.array(ours(mx.array(pixels.transpose(0, 2, 3, 1))))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL_F32)


def test_interpolation_is_not_a_no_op(hf_pair):
    """The larger-size case only proves something if the positions really change."""
    _, ours = hf_pair
    native = np.array(ours.embeddings.positions(6, 6)).reshape(6, 6, -1)
    resized = np.array(ours.embeddings.positions(10, 10)).reshape(10, 10, -1)
    assert np.abs(resized[:6, :6] - native).max() > 0.05


@pytest.mark.parametrize("size_in, size_out", [(32, 36), (32, 37), (32, 16), (6, 10), (5, 3), (4, 4)])
def test_bicubic_matrix_matches_torch(size_in, size_out):
    grid = np.random.default_rng(size_in + size_out).standard_normal((size_in, size_in, 8)).astype(np.float32)
    m = bicubic_matrix(size_in, size_out)
    ours = np.einsum("ai,ijd,bj->abd", m, grid, m)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(grid).permute(2, 0, 1)[None], size=(size_out, size_out), mode="bicubic", align_corners=False
    )[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)


def test_gelu_tanh_matches_torch():
    x = np.linspace(-30, 30, 20001, dtype=np.float32)
    expected = torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh").numpy()
    np.testing.assert_allclose(np.array(gelu_tanh(mx.array(x))), expected, rtol=1e-6, atol=1e-6)


# -- loading ----------------------------------------------------------------


def test_patch_conversion_is_idempotent_and_checked():
    cfg = _vision_config()
    torch_layout = mx.array(np.arange(96 * 3 * 7 * 7, dtype=np.float32).reshape(96, 3, 7, 7))
    once = vision_from_hf({"p.embeddings.patch_embedding.weight": torch_layout}, "p.", cfg, out_prefix="")
    converted = once["embeddings.patch_embedding.weight"]
    assert converted.shape == (96, 7, 7, 3)
    np.testing.assert_array_equal(np.array(converted), np.array(torch_layout).transpose(0, 2, 3, 1))
    twice = vision_from_hf({"p.embeddings.patch_embedding.weight": converted}, "p.", cfg, out_prefix="")
    np.testing.assert_array_equal(np.array(twice["embeddings.patch_embedding.weight"]), np.array(converted))
    with pytest.raises(LayoutError, match=r"\(96, 3, 14, 14\)"):
        vision_from_hf({"p.embeddings.patch_embedding.weight": mx.zeros((96, 3, 14, 14))}, "p.", cfg)


def test_released_preset_sizes():
    cfg = moshivis_mlx.moshika_vis().vision
    assert (cfg.width, cfg.num_layers, cfg.num_heads, cfg.mlp_hidden) == (1152, 27, 16, 4304)
    assert (cfg.patch_size, cfg.image_size, cfg.num_tokens, cfg.layer_norm_eps) == (14, 448, 1024, 1e-6)


# -- precision ----------------------------------------------------------------


def test_quantized_vision_keeps_patch_and_positions(reference):
    model = moshivis_mlx.load(FIXTURE, dtype="float32")
    exact = np.array(model.encode_image(reference["image.pixels"]))
    model.quantize_vision(bits=8, group_size=32)
    quantized = [name for name, m in model.vision.named_modules() if isinstance(m, VisionQuantizedLinear)]
    assert len(quantized) == 6 * model.cfg.vision.num_layers  # q, k, v, out, fc1, fc2
    assert not isinstance(model.vision.embeddings.position_embedding, nn.QuantizedEmbedding)
    assert model.vision.embeddings.patch_embedding.weight.dtype == mx.float32
    out = np.array(model.encode_image(reference["image.pixels"]))
    # 8-bit weights: close to the float result, but not identical.
    assert 0 < np.abs(out - exact).max() < 0.1


@pytest.mark.parametrize("input_dims", [128, 100])  # 100: padded to 128 for groups of 64
def test_vision_quantized_linear_paths_agree(input_dims):
    """The CPU counterpart (dequantize + BLAS) computes what mx.quantized_matmul computes,
    and the zero padding of an odd input width changes nothing."""
    mx.random.seed(0)  # unseeded, about 1 draw of the weights in 40 failed the 1e-2 bound below
    linear = nn.Linear(input_dims, 96)
    layer = VisionQuantizedLinear.from_linear(linear, group_size=64, bits=8)
    x = mx.random.normal((1, 40, input_dims), key=mx.random.key(0))
    by_dequantizing = np.array(CpuVisionQuantizedLinear.__call__(layer, x))
    padded = mx.pad(x, [(0, 0), (0, 0), (0, layer.padding)]) if layer.padding else x
    by_quantized_matmul = np.array(nn.QuantizedLinear.__call__(layer, padded))
    np.testing.assert_array_equal(np.array(layer(x)), by_quantized_matmul)  # the plain layer pads
    np.testing.assert_allclose(by_dequantizing, by_quantized_matmul, rtol=0, atol=1e-5)
    error = np.abs(by_dequantizing - np.array(linear(x))).max()
    assert 1e-5 < error < 1e-2  # quantized, and 8 bits are close


def test_generic_quantized_vision_layers_get_the_vision_kernels(reference):
    """A checkpoint quantized by the general policy (plain nn.QuantizedLinear in the
    tower) loads with the tower's kernels and computes the same features."""
    model = moshivis_mlx.load(FIXTURE, dtype="float32", policy=QuantizationPolicy.mixed(8, 32, vision_bits=8))
    layers = [m for _, m in model.vision.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert layers and all(isinstance(m, VisionQuantizedLinear) for m in layers)
    out = np.array(model.encode_image(reference["image.pixels"]))
    assert 0 < np.abs(out - reference["image.encoder_out"]).max() < 0.1
    fc1 = model.vision.encoder.layers[0].mlp.fc1
    x = mx.random.normal((1, 16, fc1.input_dims), key=mx.random.key(1))
    np.testing.assert_allclose(np.array(fc1(x)), np.array(nn.QuantizedLinear.__call__(fc1, x)), rtol=0, atol=1e-5)


def test_full_size_tower_quantizes_every_encoder_linear():
    tower = SiglipVisionTower(VisionConfig(num_layers=1))  # released widths, lazy weights
    quantize_vision_tower(tower, bits=8, group_size=64)
    layers = {name: m for name, m in tower.named_modules() if isinstance(m, VisionQuantizedLinear)}
    assert sorted(n.rsplit(".", 1)[-1] for n in layers) == ["fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj"]
    assert layers["encoder.layers.0.mlp.fc2"].input_dims == 4304  # padded to 4352 inside


def test_vision_compute_dtype_follows_the_platform_path():
    model = moshivis_mlx.MoshiVis(fixture_config())  # lazy weights, never loaded: what a GPU runs
    model.vision.set_dtype(mx.bfloat16)
    assert model.vision_compute_dtype() == mx.bfloat16
    model.platform_path = dataclasses.replace(CPU_PATH, image_dtype="float32")  # a CPU with a fast BLAS
    assert model.vision_compute_dtype() == mx.float32
    model.vision.set_dtype(mx.float32)
    model.platform_path = CPU_PATH  # MLX's bundled reference BLAS: the weights' dtype
    assert model.vision_compute_dtype() == mx.float32


def test_bf16_vision_storage(reference):
    model = moshivis_mlx.load(FIXTURE, dtype="float32")
    model.cast_vision(mx.bfloat16)
    assert model.vision.encoder.layers[0].mlp.fc1.weight.dtype == mx.bfloat16
    # The fixture's weights are bf16 values, so bf16 storage with float32
    # compute (the default on the CPU) loses nothing: still the official result.
    out = model.encode_image(reference["image.pixels"])
    assert out.dtype == model.vision_compute_dtype()
    out = model.encode_image(reference["image.pixels"], dtype=mx.float32)
    np.testing.assert_allclose(np.array(out), reference["image.encoder_out"], rtol=0, atol=ATOL_F32)
    # bf16 compute is close, not exact.
    out_bf16 = model.encode_image(reference["image.pixels"], dtype=mx.bfloat16)
    assert out_bf16.dtype == mx.bfloat16
    error = np.abs(np.array(out_bf16.astype(mx.float32)) - reference["image.encoder_out"]).max()
    assert 1e-4 < error < 0.1
