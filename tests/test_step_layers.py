"""The step's building blocks: kept weight views, one-row blocks, attention written out.

These are speed devices; each must compute what the plain MLX call computes.
"""

from __future__ import annotations

import tempfile

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from moshivis_mlx.cpu import layers
from moshivis_mlx.cpu.layers import CpuLinear as Linear, add_linear, attend, keep_transposed_weights

# float32 products of 64..300 terms, summed in another order (blocks, BLAS kernels): ~1e-6 relative
RTOL = 1e-5


def linear(in_features: int, out_features: int, bias: bool = False, seed: int = 0) -> Linear:
    layer = Linear(in_features, out_features, bias=bias)
    layer.update({k: mx.random.normal(v.shape, key=mx.random.key(seed + i)) for i, (k, v) in enumerate(layer.items())})
    mx.eval(layer.parameters())
    return layer


def evaluated(*shape: int, seed: int = 0) -> mx.array:
    x = mx.random.normal(shape, key=mx.random.key(seed))
    mx.eval(x)
    return x


def reference(layer: Linear, x: mx.array) -> np.ndarray:
    out = np.array(x, np.float64) @ np.array(layer.weight, np.float64).T
    return out + np.array(layer.bias, np.float64) if "bias" in layer else out


def graph_ops(*outputs: mx.array) -> list[str]:
    with tempfile.NamedTemporaryFile("r", suffix=".dot") as f:
        mx.export_to_dot(f.name, *outputs)
        lines = f.read().splitlines()
    return [line.split('label ="')[-1].split('"')[0] for line in lines if "rectangle" in line]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 5])
def test_kept_views_compute_the_same_product(bias, rows):
    layer = linear(96, 300, bias)
    x = mx.random.normal((rows, 96), key=mx.random.key(9))
    plain = np.array(layer(x))
    keep_transposed_weights(layer)
    np.testing.assert_allclose(np.array(layer(x)), plain, rtol=0, atol=0)
    np.testing.assert_allclose(plain, reference(layer, x), rtol=RTOL, atol=RTOL)


def test_kept_view_removes_the_transpose_from_the_graph():
    layer = linear(32, 48)
    x = evaluated(1, 32)
    assert "Transpose" in graph_ops(layer(x))
    keep_transposed_weights(layer)
    assert graph_ops(layer(x)) == ["Matmul"]


def test_a_replaced_weight_is_never_served_from_a_kept_view():
    layer = linear(16, 24)
    keep_transposed_weights(layer)
    layer.weight = layer.weight * 2  # e.g. update() or set_dtype() after a stream was made
    x = mx.random.normal((1, 16))
    np.testing.assert_allclose(np.array(layer(x)), reference(layer, x), rtol=RTOL, atol=RTOL)
    layer.set_dtype(mx.bfloat16)
    assert layer(x.astype(mx.bfloat16)).dtype == mx.bfloat16


def test_kept_views_are_not_parameters_and_cost_no_memory():
    layer = linear(256, 4096)
    mx.eval(layer.parameters())
    before = mx.get_active_memory()
    keep_transposed_weights(layer)
    assert mx.get_active_memory() - before < 4096  # views of the weight's own buffer
    assert set(layer.parameters()) == {"weight"}


@pytest.mark.parametrize("bias", [False, True])
def test_one_row_blocks_give_the_whole_product(monkeypatch, bias):
    """Forced blocks of 40 rows (OpenBLAS's small-kernel limit at these widths)."""
    monkeypatch.setattr(layers, "one_row_block_rows", lambda in_features, out_features: 40)
    layer = linear(64, 130, bias)  # 4 blocks, the last one short
    keep_transposed_weights(layer)
    x = evaluated(1, 64, seed=3)
    ops = graph_ops(layer(x))
    assert sum(op in ("Matmul", "AddMM") for op in ops) == 4 and "Concatenate" in ops  # the bias rides in AddMM
    np.testing.assert_allclose(np.array(layer(x)), reference(layer, x), rtol=RTOL, atol=RTOL)
    residual = mx.random.normal((1, 130), key=mx.random.key(4))
    np.testing.assert_allclose(
        np.array(add_linear(residual, layer, x)), np.array(residual) + reference(layer, x), rtol=RTOL, atol=RTOL
    )
    several = evaluated(3, 64)  # more than one row: one product, no blocks
    assert len(graph_ops(layer(several))) == (2 if bias else 1)  # one product (and the bias), no blocks


def test_add_linear_is_one_addmm():
    layer = linear(64, 48)
    keep_transposed_weights(layer)
    x, residual = evaluated(1, 64), evaluated(1, 48, seed=1)
    out = add_linear(residual, layer, x)
    assert graph_ops(out) == ["AddMM"]
    np.testing.assert_allclose(np.array(out), np.array(residual) + reference(layer, x), rtol=RTOL, atol=RTOL)
    quantized = nn.QuantizedLinear.from_linear(layer)
    np.testing.assert_allclose(
        np.array(add_linear(residual, quantized, x)), np.array(residual + quantized(x)), rtol=0, atol=0
    )


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_attend_matches_mlx_fused_attention(masked, dtype):
    keys = mx.random.normal((1, 2, 37, 16), key=mx.random.key(1)).astype(dtype)
    values = mx.random.normal((1, 2, 37, 16), key=mx.random.key(2)).astype(dtype)
    q = mx.random.normal((1, 2, 1, 16), key=mx.random.key(3)).astype(dtype)
    mask = (mx.arange(37) % 3 != 1) if masked else None
    ours = np.array(attend(q, keys, values, 0.25, mask).astype(mx.float32))
    fused = np.array(mx.fast.scaled_dot_product_attention(q, keys, values, scale=0.25, mask=mask).astype(mx.float32))
    tolerance = 1e-6 if dtype == mx.float32 else 2e-2  # bf16: one rounding of ~0.4% either side
    np.testing.assert_allclose(ours, fused, rtol=0, atol=tolerance)


def test_scores_in_blocks_equal_the_whole_product():
    keys = mx.random.normal((1, 2, 3000, 16), key=mx.random.key(5))
    q = mx.random.normal((1, 2, 1, 16), key=mx.random.key(6))
    whole = np.array(q @ keys.swapaxes(-1, -2))
    for blocks in (2, 3, 8):
        # float32 sums of 16 products taken in another order: rounding only
        np.testing.assert_allclose(np.array(layers.scores_in_blocks(q, keys, blocks)), whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_attention_over_a_long_window_in_key_blocks(monkeypatch, masked):
    """Forced blocks: a float32 window of 3000 slots (the released context) read in 3 blocks,
    as on OpenBLAS's small-matrix kernel, gives MLX's fused attention; a sliced window too."""
    monkeypatch.setattr(layers, "key_blocks", lambda head_dim, num_keys: 3 if num_keys % 3 == 0 else 1)
    blocked = []
    real = layers.scores_in_blocks
    monkeypatch.setattr(layers, "scores_in_blocks", lambda *a, **k: blocked.append(a[2]) or real(*a, **k))
    window = mx.random.normal((1, 2, 3000, 16), key=mx.random.key(7))
    values = mx.random.normal((1, 2, 3000, 16), key=mx.random.key(8))
    q = mx.random.normal((1, 2, 1, 16), key=mx.random.key(9))
    for keys, vals in ((window, values), (window[:, :, :2049], values[:, :, :2049])):
        mask = (mx.arange(keys.shape[2]) % 5 != 2) if masked else None
        out = attend(q, keys, vals, 0.25, mask)
        assert blocked.pop() == 3
        assert sum(op == "Matmul" for op in graph_ops(out)) == 2  # one batched product for all blocks
        fused = mx.fast.scaled_dot_product_attention(q, keys, vals, scale=0.25, mask=mask)
        np.testing.assert_allclose(np.array(out), np.array(fused), rtol=0, atol=1e-6)
