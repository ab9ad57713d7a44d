"""Large products spread over CPU streams: same numbers, bit for bit, on any number of streams."""

from __future__ import annotations

import threading

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import moshivis_mlx as mv
from moshivis_mlx.cpu import cores
from moshivis_mlx.cpu.layers import CpuLinear as Linear, CpuQuantizedLinear as QuantizedLinear, attend, keep_transposed_weights
from moshivis_mlx.cpu.platform_path import apply_platform_path

from conftest import CPU_PATH, random_model, tiny_config


@pytest.fixture
def three_streams(monkeypatch):
    monkeypatch.setenv(cores.STREAMS_VARIABLE, "3")
    assert len(cores.cpu_streams()) == 3


@pytest.mark.parametrize("out_features, parts", [(4096, 2), (11264, 3), (1100, 4), (1 << 20, 7)])
def test_split_rows_cover_every_row_once_in_multiples_of_eight(out_features, parts):
    bounds = cores.split_rows(out_features, 1024, parts)
    assert bounds is not None and 1 < len(bounds) <= parts
    assert bounds[0][0] == 0 and bounds[-1][1] == out_features
    assert all(stop == start for (_, stop), (start, _) in zip(bounds, bounds[1:]))
    assert all(start % 8 == 0 for start, _ in bounds)


def test_small_products_and_one_stream_are_not_split():
    assert cores.split_rows(512, 1024, 2) is None  # 0.5 M weights: the hand-over costs more
    assert cores.split_rows(8192, 1024, 1) is None


def test_streams_variable(monkeypatch, capsys):
    monkeypatch.setenv(cores.STREAMS_VARIABLE, "1")
    assert cores.cpu_streams() == (None,)  # the default stream alone
    monkeypatch.setenv(cores.STREAMS_VARIABLE, "3")
    streams = cores.cpu_streams()
    assert len(streams) == 3 and streams[0] is None and streams[1] != streams[2]
    monkeypatch.setenv(cores.STREAMS_VARIABLE, "lots")
    assert cores.requested_streams() == cores.usable_cores()
    assert f"ignoring {cores.STREAMS_VARIABLE}='lots'" in capsys.readouterr().err


def bf16_linear(in_features: int, out_features: int, bias: bool = False) -> Linear:
    layer = Linear(in_features, out_features, bias=bias)
    layer.update({k: mx.random.normal(v.shape, key=mx.random.key(i)) * 0.05 for i, (k, v) in enumerate(layer.items())})
    layer.set_dtype(mx.bfloat16)
    mx.eval(layer.parameters())
    return layer


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3])
def test_a_spread_bf16_product_is_bit_identical(three_streams, bias, rows):
    layer = bf16_linear(512, 2056, bias)  # 2056 rows: the last block is shorter
    x = mx.random.normal((rows, 512), key=mx.random.key(7)).astype(mx.bfloat16)
    residual = mx.random.normal((rows, 2056), key=mx.random.key(8)).astype(mx.bfloat16)
    plain, plain_added = layer(x), layer.add_to(residual, x, alpha=0.5)
    keep_transposed_weights(layer)
    kept = layer._kept_views()
    assert kept is not None and len({repr(block.stream) for block in kept.core_blocks}) == 3
    for got, expected in [(mx.compile(layer)(x), plain), (layer.add_to(residual, x, alpha=0.5), plain_added)]:
        np.testing.assert_array_equal(np.array(got.astype(mx.float32)), np.array(expected.astype(mx.float32)))


@pytest.mark.parametrize("bits", [4, 8])
def test_a_spread_quantized_product_is_bit_identical(three_streams, bits):
    model = nn.Sequential(Linear(1024, 1536, bias=True))
    nn.quantize(model, group_size=64, bits=bits)
    layer = model.layers[0]
    assert isinstance(layer, QuantizedLinear)
    x = mx.random.normal((1, 1024), key=mx.random.key(3))
    plain = np.array(layer(x))
    np.testing.assert_array_equal(plain, np.array(nn.QuantizedLinear.__call__(layer, x)))
    keep_transposed_weights(model)
    assert len(layer.__dict__["_kept"][1]) == 3
    np.testing.assert_array_equal(np.array(mx.compile(layer)(x)), plain)


@pytest.mark.parametrize("masked", [False, True])
def test_a_large_attention_split_by_heads_is_bit_identical(monkeypatch, masked):
    keys, values = (mx.random.normal((1, 6, 1100, 160), key=mx.random.key(i)) for i in (1, 2))
    q = mx.random.normal((1, 6, 1, 160), key=mx.random.key(3))
    mask = (mx.arange(1100) % 5 != 2) if masked else None
    monkeypatch.setenv(cores.STREAMS_VARIABLE, "1")
    whole = np.array(attend(q, keys, values, 0.3, mask))
    monkeypatch.setenv(cores.STREAMS_VARIABLE, "3")
    assert cores.split_rows(6, 1100 * 160, 3, multiple=1) == [(0, 2), (2, 4), (4, 6)]
    np.testing.assert_array_equal(np.array(mx.compile(lambda q: attend(q, keys, values, 0.3, mask))(q)), whole)


def test_a_replaced_weight_is_never_served_from_kept_blocks(three_streams):
    layer = bf16_linear(512, 2048)
    keep_transposed_weights(layer)
    layer.weight = layer.weight * 2
    x = mx.random.normal((1, 512), key=mx.random.key(1)).astype(mx.bfloat16)
    np.testing.assert_array_equal(np.array(layer(x).astype(mx.float32)), np.array((x @ layer.weight.T).astype(mx.float32)))


def streamed_logits(streams: str, monkeypatch) -> tuple[np.ndarray, np.ndarray, int]:
    monkeypatch.setenv(cores.STREAMS_VARIABLE, streams)
    cfg = tiny_config(dim=256, ffn_hidden=4096, num_heads=4, xa_start=0)  # FFN products of 2 M weights
    model = random_model(cfg)
    model.set_dtype(mx.bfloat16)
    apply_platform_path(model, CPU_PATH)  # the kept views of the bf16 weights
    features = mx.random.normal((cfg.vision.num_tokens, cfg.vision.width), key=mx.random.key(5))
    stream = mv.Stream(model, features, greedy=True)
    spread = sum(1 for m in model.modules() if isinstance(m, Linear) and m._kept_views().core_blocks)
    text, audio = [], []
    for t in range(4):
        out = stream.step(np.full(cfg.num_user_codebooks, t % cfg.audio_card, np.int32))
        text.append(np.array(out.text_logits.astype(mx.float32)))
        audio.append(np.array(out.audio_logits.astype(mx.float32)))
    return np.stack(text), np.stack(audio), spread


def test_a_stream_computes_the_same_on_one_or_several_cpu_streams(monkeypatch):
    text_one, audio_one, spread_one = streamed_logits("1", monkeypatch)
    text_three, audio_three, spread_three = streamed_logits("3", monkeypatch)
    assert spread_one == 0 and spread_three == 2 * 2  # both layers' FFN products
    np.testing.assert_array_equal(text_three, text_one)
    np.testing.assert_array_equal(audio_three, audio_one)

    # A conversation runs its model on a worker thread: the streams are that thread's own.
    results = []
    worker = threading.Thread(target=lambda: results.append(streamed_logits("3", monkeypatch)))
    worker.start()
    worker.join()
    np.testing.assert_array_equal(results[0][0], text_one)
