"""`StepOutput.gate`: how much the picture shaped each piece of text.

The reference is a whole-sequence forward written here from the official
formula (x += g * y, g = sigmoid(W2 relu(W1 y) - 4)), teacher-forced with the
tokens the stream embedded, averaging g over the last 10 layers as Kyutai's
servers do. The stream's gate must be the one of the step that sampled the
text it outputs (`max_delay - text delay` steps before).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from moshivis_mlx.model.temporal import SharedCrossAttention

from conftest import random_model, tiny_config

NUM_LAYERS = 12  # more than the 10 that are averaged
LAST = 10
STEPS = 14
SWITCH_OFF_AT = 10


def reference_gates(model, tokens_in: np.ndarray, image) -> np.ndarray:
    """Mean gate of the last 10 layers at each step (T,), 0 before xa_start."""
    cfg = model.cfg
    tr = model.transformer
    x = model.embed_tokens(mx.array(tokens_in))[None]  # (1, T, dim)
    t = x.shape[1]
    steps = mx.arange(t)
    delta = steps[:, None] - steps[None, :]
    mask = (delta >= 0) & (delta < cfg.context)
    active = steps >= cfg.xa_start
    per_layer = []
    for layer in tr.layers:
        x = x + layer.self_attn.forward_sequence(layer.norm1(x), mask)
        y = SharedCrossAttention.__call__(tr.cross_attention, layer.norm_cross(x), image)  # the plain module's
        g = mx.sigmoid(layer.cross_gate.linear_out(mx.maximum(layer.cross_gate.linear_in(y), 0)) - 4.0)
        x = mx.where(active[None, :, None], x + g * y, x)
        x = x + layer.gating(layer.norm2(x))
        per_layer.append(g[0].mean(axis=-1))  # (T,)
    gates = mx.stack(per_layer[-LAST:]).mean(axis=0)
    return np.where(np.array(active), np.array(gates), 0.0)


def test_gate_is_the_mean_of_the_last_ten_layers_at_the_step_that_sampled_the_text():
    cfg = tiny_config(num_layers=NUM_LAYERS, context=32)
    model = random_model(cfg, seed=3)
    features = mx.random.normal((4, cfg.vision.width), key=mx.random.key(5))
    stream = model.stream(image=features, greedy=True)
    text_lag = cfg.max_delay - cfg.delays[0]
    assert text_lag == 1  # so a gate one step off would be caught
    rng = np.random.default_rng(0)
    tokens_in, gates = [], []
    for _ in range(STEPS):
        out = stream.step(rng.integers(0, cfg.audio_card, cfg.num_user_codebooks))
        tokens_in.append(np.array(out.input_tokens))
        gates.append(None if out.gate is None else float(out.gate.item()))
    expected = reference_gates(model, np.stack(tokens_in), stream.image)
    assert gates[: cfg.max_delay] == [None] * cfg.max_delay
    got = np.array(gates[cfg.max_delay :])
    want = expected[cfg.max_delay - text_lag : STEPS - text_lag]
    assert (want[cfg.xa_start :] > 0).all() and np.ptp(want[cfg.xa_start :]) > 1e-4  # distinct per step
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_no_image_no_gate():
    cfg = tiny_config()
    model = random_model(cfg, seed=1)
    stream = model.stream(image=mx.random.normal((4, cfg.vision.width)), greedy=True)
    gates = []
    for t in range(STEPS):
        if t == SWITCH_OFF_AT:
            stream.set_image(None)
        out = stream.step(np.zeros(cfg.num_user_codebooks, np.int64))
        gates.append(None if out.gate is None else float(out.gate.item()))
    text_lag = cfg.max_delay - cfg.delays[0]
    assert all(g > 0 for g in gates[cfg.xa_start + text_lag : SWITCH_OFF_AT + text_lag])
    assert gates[SWITCH_OFF_AT + text_lag :] == [0.0] * (STEPS - SWITCH_OFF_AT - text_lag)
