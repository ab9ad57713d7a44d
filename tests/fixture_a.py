"""Fixture A: paths, tolerances, teacher-forced runs; shared by the loading and conversion tests."""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from safetensors.numpy import load_file

import moshivis_mlx as mv

from conftest import FIXTURE_A, fixture_config  # noqa: F401 (re-exported)

UPSTREAM = FIXTURE_A / "upstream_mlx"
UPSTREAM_FILES = {"bf16": "model.safetensors", "q8": "model.q8.safetensors", "q4": "model.q4.safetensors"}

# Teacher-forced logit tolerances of tests/fixtures/README.md (text, audio),
# against the official float32 outputs.
TOLERANCE = {"bf16": (0.15, 1.0), "q8": (0.5, 3.0), "q4": (3.0, 15.0)}


@lru_cache(maxsize=1)
def reference() -> dict[str, np.ndarray]:
    return load_file(str(FIXTURE_A / "reference.safetensors"))


class Replay:
    """A token sampler that returns the reference tokens in order."""

    def __init__(self, tokens: np.ndarray):
        self._tokens = iter(tokens.reshape(-1).tolist())

    def __call__(self, logits: mx.array, key: mx.array | None = None) -> mx.array:
        return mx.array([next(self._tokens)], dtype=mx.int32)


def teacher_forced(model: mv.MoshiVis, run: str = "with_image") -> tuple[np.ndarray, np.ndarray]:
    """(text logits (T, text_card), audio logits (T, 8, audio_card)) fed the official tokens."""
    ref = reference()
    sampler = mv.SamplerConfig(text=Replay(ref[f"{run}.text_tokens"]), audio=Replay(ref[f"{run}.audio_tokens"]))
    image = mx.array(ref["image.encoder_out"]) if run == "with_image" else None
    stream = mv.Stream(model, image, sampler=sampler, compiled=False)  # the replay keeps Python state
    text, audio = [], []
    for codes in ref["user_tokens"]:
        out = stream.step(codes)
        text.append(np.array(out.text_logits.astype(mx.float32)))
        audio.append(np.array(out.audio_logits.astype(mx.float32)))
    return np.stack(text), np.stack(audio)


def logit_errors(model: mv.MoshiVis, run: str = "with_image") -> tuple[float, float]:
    """Max |difference| of text and audio logits from the official float32 run."""
    ref = reference()
    text, audio = teacher_forced(model, run)
    return float(np.abs(text - ref[f"{run}.text_logits"]).max()), float(np.abs(audio - ref[f"{run}.audio_logits"]).max())


def assert_same_params(a: mv.MoshiVis, b: mv.MoshiVis) -> None:
    """Same parameter names, dtypes and bits."""
    pa, pb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    assert set(pa) == set(pb)
    different = [k for k in pa if pa[k].dtype != pb[k].dtype or not mx.array_equal(pa[k], pb[k]).item()]
    assert not different, different[:5]
