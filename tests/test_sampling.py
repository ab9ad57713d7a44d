"""Samplers: seeded reproducibility, filters, repetition penalty."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import moshivis_mlx as mv
from moshivis_mlx.model.sampling import RepetitionPenalty

from conftest import random_model, tiny_config


def generate(model, sampler, steps=12):
    stream = model.stream(sampler=sampler)
    user = np.zeros(model.cfg.num_user_codebooks, np.int32)
    return np.stack([np.array(stream.step(user).tokens) for _ in range(steps)][1:])


def test_seeded_sampling_is_reproducible():
    model = random_model(tiny_config())
    hot = mv.TokenSampler(temperature=2.0)
    a = generate(model, mv.SamplerConfig(text=hot, audio=hot, seed=7))
    mx.random.seed(123)  # global randomness must not matter
    b = generate(model, mv.SamplerConfig(text=hot, audio=hot, seed=7))
    c = generate(model, mv.SamplerConfig(text=hot, audio=hot, seed=8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_defaults_are_the_reference_web_client_values():
    s = mv.SamplerConfig()
    assert (s.text.temperature, s.text.top_k) == (0.45, 25)
    assert (s.audio.temperature, s.audio.top_k) == (0.7, 250)
    assert mv.moshika_vis().xa_start == 16


def test_greedy_is_argmax():
    logits = mx.array([[0.1, 3.0, -1.0, 2.9]])
    assert mv.TokenSampler()(logits).tolist() == [1]


def test_top_k_only_draws_from_the_k_best():
    logits = mx.random.normal((1, 50), key=mx.random.key(0))
    best = set(np.argsort(-np.array(logits[0]))[:3].tolist())
    sampler = mv.TokenSampler(temperature=5.0, top_k=3)
    keys = mx.random.split(mx.random.key(1), 300)
    drawn = {int(sampler(logits, keys[i])[0]) for i in range(300)}
    assert drawn == best


def test_top_p_applies_to_the_tempered_distribution():
    # probabilities at temperature 1: 0.6, 0.3, 0.1. With temperature 0.5 they
    # become 0.78, 0.20, 0.02, so top-p 0.75 keeps only the first token.
    logits = mx.log(mx.array([[0.6, 0.3, 0.1]]))
    keys = mx.random.split(mx.random.key(2), 200)
    cold = mv.TokenSampler(temperature=0.5, top_p=0.75)
    assert {int(cold(logits, keys[i])[0]) for i in range(200)} == {0}
    warm = mv.TokenSampler(temperature=1.0, top_p=0.75)
    assert {int(warm(logits, keys[i])[0]) for i in range(200)} == {0, 1}


def remember_all(penalty: RepetitionPenalty, tokens) -> mx.array:
    recent = penalty.initial_recent()
    for step, token in enumerate(tokens):
        recent = penalty.remember(recent, mx.array([token], dtype=mx.int32), mx.array(step))
    return recent


def test_repetition_penalty_is_sign_aware_and_skips_padding():
    penalty = RepetitionPenalty(2.0, window=4, vocab=6, padding_ids=(0, 3))
    recent = remember_all(penalty, (1, 3, 4))
    logits = mx.array([[1.0, 2.0, 1.0, 1.0, -1.0, 1.0]])
    out = np.array(penalty.penalize(logits, recent))[0]
    np.testing.assert_allclose(out, [1.0, 1.0, 1.0, 1.0, -2.0, 1.0])


def test_repetition_penalty_window_forgets_old_tokens():
    penalty = RepetitionPenalty(2.0, window=2, vocab=6, padding_ids=(0, 3))
    recent = remember_all(penalty, (1, 2, 4))
    out = np.array(penalty.penalize(mx.ones((1, 6)), recent))[0]
    np.testing.assert_allclose(out, [1, 1, 0.5, 1, 0.5, 1])


def test_stream_with_repetition_penalty_runs():
    model = random_model(tiny_config())
    sampler = mv.SamplerConfig(repetition_penalty=1.3, repetition_window=5, seed=0)
    tokens = generate(model, sampler)
    assert tokens.shape == (11, 1 + model.cfg.num_generated_codebooks)


@pytest.mark.parametrize(
    "kwargs", [dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)]
)
def test_invalid_sampler_settings(kwargs):
    with pytest.raises(ValueError):
        mv.TokenSampler(**kwargs)


def test_greedy_and_sampler_are_exclusive():
    model = random_model(tiny_config())
    with pytest.raises(ValueError, match="either greedy"):
        model.stream(greedy=True, sampler=mv.SamplerConfig())


@pytest.mark.parametrize("temperature,top_k", [(0.45, 5), (1.7, 12)])
def test_top_k_draws_follow_the_tempered_distribution_of_the_k_best(temperature, top_k):
    """Top-k sampling draws among the k best only; their frequencies must match
    softmax(logits / T) renormalised over those k (within 4 standard errors)."""
    vocab, draws = 60, 20000
    logits = mx.random.normal((1, vocab), key=mx.random.key(3)) * 2
    sampler = mv.TokenSampler(temperature=temperature, top_k=top_k)
    tokens = np.array(sampler(mx.repeat(logits, draws, axis=0), mx.random.key(4)))
    l64 = np.array(logits[0], np.float64) / temperature
    best = np.argsort(-l64)[:top_k]
    expected = np.zeros(vocab)
    expected[best] = np.exp(l64[best] - l64[best].max())
    expected /= expected.sum()
    seen = np.bincount(tokens, minlength=vocab) / draws
    tolerance = 4 * np.sqrt(expected * (1 - expected) / draws) + 1e-9
    assert np.all(np.abs(seen - expected) <= tolerance), np.abs(seen - expected).max()
