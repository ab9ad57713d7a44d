"""The resampler against analytic signals: a resampled sine must be the same sine."""

from __future__ import annotations

import numpy as np
import pytest

from moshivis_mlx.audio.resample import Resampler, output_length, resample

RATE_PAIRS = [(48000, 24000), (44100, 24000), (16000, 24000), (8000, 24000), (24000, 48000), (24000, 44100)]


def sine(freq: float, rate: int, n: int) -> np.ndarray:
    return np.sin(2 * np.pi * freq * np.arange(n) / rate)


def middle(x: np.ndarray) -> np.ndarray:
    return x[len(x) // 4 : 3 * len(x) // 4]


@pytest.mark.parametrize("src,dst", RATE_PAIRS)
def test_passband_sines_come_out_unchanged(src, dst):
    nyquist = min(src, dst) / 2
    for fraction in (0.05, 0.3, 0.6, 0.8):
        freq = fraction * nyquist
        out = resample(sine(freq, src, src), src, dst)
        ideal = sine(freq, dst, len(out))  # output sample n is at input time n * src / dst
        # 24 zero-crossings, Kaiser beta 9: measured error ~4e-5 at 0.8 x Nyquist.
        assert np.max(np.abs(middle(out) - middle(ideal))) < 1e-4, (src, dst, freq)


@pytest.mark.parametrize("src,dst", [(48000, 24000), (44100, 24000)])
def test_what_would_alias_is_removed(src, dst):
    for freq in (0.55 * src / 2 + 0.45 * dst / 2, 0.9 * src / 2):  # between the two Nyquist frequencies
        out = resample(sine(freq, src, src), src, dst)
        level_db = 20 * np.log10(np.sqrt(2 * np.mean(middle(out) ** 2)))
        assert level_db < -90, (freq, level_db)


def test_cutoff_is_where_the_docstring_says():
    src, dst = 48000, 24000
    gains = {}
    for fraction in (0.85, 0.9):
        out = resample(sine(fraction * dst / 2, src, src), src, dst)
        gains[fraction] = 20 * np.log10(np.sqrt(2 * np.mean(middle(out) ** 2)))
    assert -0.3 < gains[0.85] < -0.1
    assert -3.5 < gains[0.9] < -2.5


@pytest.mark.parametrize("src,dst", [(44100, 24000), (24000, 48000)])
def test_streaming_in_random_blocks_equals_whole_file(src, dst):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(src).astype(np.float32)
    whole = resample(x, src, dst)
    stream = Resampler(src, dst)
    pieces, i = [], 0
    while i < len(x):
        k = int(rng.integers(1, 3000))
        pieces.append(stream.process(x[i : i + k]))
        i += k
    streamed = np.concatenate(pieces)
    # The stream holds back its last `latency` input samples' worth of output.
    assert len(whole) - len(streamed) <= stream.latency * dst / src + 2
    np.testing.assert_array_equal(streamed, whole[: len(streamed)])


def test_lengths_constant_signal_and_passthrough():
    assert output_length(44100, 44100, 24000) == 24000
    assert output_length(10, 48000, 24000) == 5 and output_length(11, 48000, 24000) == 6
    for src, dst in RATE_PAIRS:
        out = resample(np.full(src // 10, 0.5, np.float32), src, dst)
        assert len(out) == output_length(src // 10, src, dst)
        np.testing.assert_allclose(middle(out), 0.5, atol=1e-6)  # every phase's taps sum to 1
    x = np.arange(7, dtype=np.float32)
    np.testing.assert_array_equal(resample(x, 24000, 24000), x)


def test_bad_rates_are_refused():
    with pytest.raises(ValueError, match="positive"):
        Resampler(0, 24000)
