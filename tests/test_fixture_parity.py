"""The model against outputs of the official PyTorch implementation (fixture A).

Tolerances follow tests/fixtures/README.md: float32 against float32 leaves only
rounding noise (we allow 1e-3 on logits, 1e-4 on the temporal output; measured
differences are ~3e-5); bf16 is compared under teacher forcing with 0.15 (text)
and 1.0 (audio), above the 0.078 / 0.48 that PyTorch itself shows in bf16.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import moshivis_mlx as mv
from moshivis_mlx.model.config import NORM_MEAN_SQUARE, NORM_VARIANCE

from conftest import FIXTURE_A, NORM_PREFIX, fixture_config

RUNS = ("with_image", "no_image")
NORMS = (NORM_VARIANCE, NORM_MEAN_SQUARE)


def run_stream(stream: mv.Stream, user_tokens: np.ndarray) -> dict[str, np.ndarray]:
    record: dict[str, list] = {k: [] for k in ("out_tokens", "text_logits", "audio_logits", "transformer_out", "model_input_tokens")}
    for codes in user_tokens:
        out = stream.step(codes)
        record["out_tokens"].append(np.full(9, -1) if out.tokens is None else np.array(out.tokens))
        record["text_logits"].append(np.array(out.text_logits.astype(mx.float32)))
        record["audio_logits"].append(np.array(out.audio_logits.astype(mx.float32)))
        record["transformer_out"].append(np.array(out.transformer_out.astype(mx.float32)))
        record["model_input_tokens"].append(np.array(out.input_tokens))
    return {k: np.stack(v) for k, v in record.items()}


@pytest.fixture(scope="module", params=NORMS)
def float32_model(request):
    return mv.load(FIXTURE_A, dtype="float32", config=fixture_config(request.param))


@pytest.mark.parametrize("run", RUNS)
def test_float32_greedy_matches_official(float32_model, reference, run):
    prefix = NORM_PREFIX[float32_model.cfg.depformer_norm] + run
    image = mx.array(reference["image.encoder_out"]) if run == "with_image" else None
    got = run_stream(float32_model.stream(image, greedy=True), reference["user_tokens"])

    np.testing.assert_array_equal(got["model_input_tokens"], reference[f"{prefix}.model_input_tokens"])
    np.testing.assert_array_equal(got["out_tokens"], reference[f"{prefix}.out_tokens"])
    np.testing.assert_allclose(got["text_logits"], reference[f"{prefix}.text_logits"], atol=1e-3, rtol=0)
    np.testing.assert_allclose(got["audio_logits"], reference[f"{prefix}.audio_logits"], atol=1e-3, rtol=0)
    np.testing.assert_allclose(got["transformer_out"], reference[f"{prefix}.transformer_out"], atol=1e-4, rtol=0)


def test_image_changes_the_output(float32_model, reference):
    """Guards against a cross-attention that silently does nothing."""
    prefix = NORM_PREFIX[float32_model.cfg.depformer_norm]
    with_image = reference[f"{prefix}with_image.text_logits"]
    no_image = reference[f"{prefix}no_image.text_logits"]
    xa_start = float32_model.cfg.xa_start
    assert np.abs(with_image[:xa_start] - no_image[:xa_start]).max() < 1e-5
    assert np.abs(with_image[xa_start:] - no_image[xa_start:]).max() > 1.0


def forced_sampler(tokens: np.ndarray) -> mv.TokenSampler:
    """A sampler that replays reference tokens in order (teacher forcing)."""
    it = iter(tokens.reshape(-1).tolist())

    class Replay(mv.TokenSampler):
        def __call__(self, logits, key=None):
            return mx.array([next(it)], dtype=mx.int32)

    return Replay()


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])  # auto: on a CPU the depformer computes in float32
def test_bfloat16_teacher_forced_within_tolerance(reference, norm, run, dtype):
    model = mv.load(FIXTURE_A, dtype, config=fixture_config(norm))
    assert model.dtype == mx.bfloat16
    prefix = NORM_PREFIX[norm] + run
    sampler = mv.SamplerConfig(
        text=forced_sampler(reference[f"{prefix}.text_tokens"]),
        audio=forced_sampler(reference[f"{prefix}.audio_tokens"]),
    )
    image = mx.array(reference["image.encoder_out"]) if run == "with_image" else None
    stream = mv.Stream(model, image, sampler=sampler, compiled=False)  # the replay sampler keeps Python state
    got = run_stream(stream, reference["user_tokens"])
    text_err = np.abs(got["text_logits"] - reference[f"{prefix}.text_logits"]).max()
    audio_err = np.abs(got["audio_logits"] - reference[f"{prefix}.audio_logits"]).max()
    assert text_err < 0.15, text_err
    assert audio_err < 1.0, audio_err
    np.testing.assert_array_equal(got["out_tokens"], reference[f"{prefix}.out_tokens"])
