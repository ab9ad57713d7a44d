"""Streaming behaviour: equivalence with a full forward, and unbounded sessions."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import moshivis_mlx as mv
from moshivis_mlx.model.layers import visible_slots

from conftest import random_model, tiny_config


@pytest.mark.parametrize("with_image", [False, True])
@pytest.mark.parametrize("context,steps", [(5, 17), (300, 310)])
def test_step_by_step_equals_full_causal_forward(with_image, context, steps):
    """Past the sliding window (T > context) the ring cache must pick the right keys;
    context 300 also crosses a change of the visible window (256 -> 300 slots)."""
    cfg = tiny_config(context=context)
    model = random_model(cfg, seed=1)
    mx.random.seed(2)
    x = mx.random.normal((1, steps, cfg.dim))
    image = None
    if with_image:
        features = mx.random.normal((cfg.vision.num_tokens, cfg.vision.width))
        image = model.image_kv_from_features(features)

    full = model.transformer.forward_sequence(x, image, xa_start=cfg.xa_start)
    window = model.transformer.make_cache(mx.float32)
    streamed = []
    for t in range(steps):
        active = image if t >= cfg.xa_start else None
        streamed.append(model.transformer.step(x[:, t : t + 1], window, t, active))
    streamed = mx.concatenate(streamed, axis=1)
    np.testing.assert_allclose(np.array(streamed), np.array(full), atol=1e-4, rtol=1e-4)
    # ...and the window matters: attending to everything gives something else.
    everything = model.transformer.forward_sequence(x, image, xa_start=cfg.xa_start, context=steps)
    assert np.abs(np.array(everything)[:, cfg.context :] - np.array(full)[:, cfg.context :]).max() > 1e-3


def test_long_session_keeps_constant_state():
    """20,000 steps: no error, no step limit, and the caches never grow."""
    cfg = tiny_config(
        num_layers=1, context=8, depformer=mv.DepformerConfig(dim=16, num_layers=1, num_heads=2, ffn_hidden=16, num_steps=2)
    )
    model = random_model(cfg, seed=3)
    stream = model.stream(greedy=True)
    rng = np.random.default_rng(0)
    user = rng.integers(0, cfg.audio_card, size=(64, cfg.num_user_codebooks))

    def cache_shapes():
        return [tuple(a.shape) for a in stream.caches]

    for t in range(20_000):
        out = stream.step(user[t % len(user)])
        if t == cfg.context:
            after_context = cache_shapes()
        if t % 1000 == 0:
            np.array(out.tokens)  # the consumer's one sync per step, as a real client does
    tokens = np.array(out.tokens)
    assert stream.offset == 20_000
    assert cache_shapes() == after_context
    assert tokens.shape == (1 + cfg.num_generated_codebooks,)
    assert 0 <= tokens[0] < cfg.text_card and np.all((0 <= tokens[1:]) & (tokens[1:] < cfg.audio_card))


def test_delays_follow_official_conventions():
    """Step 0 sees only initial tokens; delayed streams see frame t-1 from step 2 on."""
    cfg = tiny_config()
    model = random_model(cfg)
    stream = model.stream(greedy=True)
    user = np.arange(4 * cfg.num_user_codebooks).reshape(4, -1) % cfg.audio_card
    outs = [stream.step(u) for u in user]
    inputs = np.stack([np.array(o.input_tokens) for o in outs])
    initial = [cfg.text_initial_token] + [cfg.audio_initial_token] * cfg.num_audio_codebooks
    np.testing.assert_array_equal(inputs[0], initial)
    user_rows = slice(1 + cfg.num_generated_codebooks, None)
    # delays (0, 1) for the user's two codebooks
    np.testing.assert_array_equal(inputs[1, user_rows], [user[1, 0], cfg.audio_initial_token])
    np.testing.assert_array_equal(inputs[3, user_rows], [user[3, 0], user[2, 1]])
    assert outs[0].tokens is None
    # generated text at step t-1 is the model input at step t and the output frame at t
    texts = [int(np.argmax(np.array(o.text_logits))) for o in outs]
    assert inputs[2, 0] == texts[1]
    assert int(np.array(outs[2].tokens)[0]) == texts[1]


def test_visible_slots_cover_every_written_key():
    assert [visible_slots(t, 3000) for t in (0, 255, 256, 1023, 1024, 2047, 2048, 2998, 2999, 10**6)] == [
        256, 256, 512, 1024, 2048, 2048, 3000, 3000, 3000, 3000]
    assert visible_slots(3, 24) == 24
    for t in range(0, 5000, 7):
        assert visible_slots(t, 3000) >= min(t + 1, 3000)


def test_compiled_step_equals_eager_step():
    """The compiled frame function is the eager one, traced: same logits, same tokens,
    also across the window's shape changes."""
    cfg = tiny_config(context=300)
    model = random_model(cfg, seed=4)
    features = mx.random.normal((cfg.vision.num_tokens, cfg.vision.width), key=mx.random.key(5))
    sampler = mv.SamplerConfig(seed=3, repetition_penalty=1.2, repetition_window=8)
    compiled = mv.Stream(model, features, sampler=sampler)
    eager = mv.Stream(model, features, sampler=sampler, compiled=False)
    user = np.random.default_rng(1).integers(0, cfg.audio_card, size=(270, cfg.num_user_codebooks))
    for codes in user:
        a, b = compiled.step(codes), eager.step(codes)
        np.testing.assert_allclose(np.array(a.text_logits), np.array(b.text_logits), atol=1e-5)
        np.testing.assert_allclose(np.array(a.audio_logits), np.array(b.audio_logits), atol=1e-5)
        if a.tokens is not None:
            np.testing.assert_array_equal(np.array(a.tokens), np.array(b.tokens))


@pytest.mark.parametrize("compiled", [True, False])
def test_step_updates_the_kv_window_in_place(compiled):
    """A step must not copy the window: at full size a copy is 1.5 GB of memory
    traffic and a second window's worth of peak memory every 80 ms."""
    cfg = tiny_config(context=4096, num_layers=2)
    model = random_model(cfg, seed=4)
    stream = mv.Stream(model, greedy=True, compiled=compiled)
    window_bytes = sum(a.nbytes for a in stream._window.state)
    user = np.zeros(cfg.num_user_codebooks, np.int32)
    for _ in range(3):
        np.array(stream.step(user).tokens)
    mx.synchronize()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    for _ in range(3):
        np.array(stream.step(user).tokens)
    extra = mx.get_peak_memory() - before
    assert extra < window_bytes / 4, f"a step allocated {extra} bytes beside a {window_bytes}-byte window"


@pytest.mark.parametrize("compiled", [True, False])
def test_a_step_only_queues_work(monkeypatch, tmp_path, compiled):
    """One host synchronisation per step, the client's read: step() itself never
    waits for the device. With evaluation held back, the graph of the step's
    outputs must reach back to its first operations (the KV window writes of
    every layer): anything evaluated inside step() would show up as a leaf."""
    cfg = tiny_config()
    model = random_model(cfg, seed=5)
    stream = mv.Stream(model, sampler=mv.SamplerConfig(seed=0), compiled=compiled)
    user = np.zeros(cfg.num_user_codebooks, np.int32)
    for _ in range(cfg.max_delay + 2):
        np.array(stream.step(user).tokens)

    def synchronised(*args, **kwargs):
        raise AssertionError("step() waited for the device")

    monkeypatch.setattr(mx, "eval", synchronised)
    monkeypatch.setattr(mx, "synchronize", synchronised)
    monkeypatch.setattr(mx, "async_eval", lambda *args, **kwargs: None)
    out = stream.step(user)
    monkeypatch.undo()
    graph = tmp_path / "step.dot"
    mx.export_to_dot(str(graph), out.tokens, out.audio_logits)
    text = graph.read_text()
    assert text.count("DynamicSliceUpdate") == 2 * cfg.num_layers  # this step's window writes
    assert "RandomBits" in text  # ...through to the sampled tokens
    np.array(out.tokens)  # the client's read: the one synchronisation
