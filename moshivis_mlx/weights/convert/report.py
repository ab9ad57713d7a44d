"""How much a quantized checkpoint departs from the unquantized model.

Both models see the same fixed random input (seeded user tokens and a random
image feature map) under teacher forcing: the unquantized model runs greedily,
and its tokens are fed back to the quantized one, so every step of both runs
has identical inputs and the logit differences are quantization error only.
Both run in float32 by default, which keeps bf16 arithmetic noise out of the
numbers.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ...model.config import ModelConfig
from ...model.sampling import SamplerConfig
from ...model.stream import Stream
from ..loading import load

STEPS_WITH_IMAGE = 8  # steps run after the cross-attention starts (xa_start)
DEFAULT_SEED = 0


@dataclass
class QualityReport:
    steps: int
    text_logit_max_error: float
    audio_logit_max_error: float
    text_logit_max: float  # largest |logit| of the reference, for scale
    audio_logit_max: float
    text_agreement: float  # fraction of steps whose greedy token is unchanged
    audio_agreement: float

    def lines(self) -> list[str]:
        return [
            f"teacher-forced logit error over {self.steps} steps (max |diff|): "
            f"text {self.text_logit_max_error:.4g} (reference logits up to {self.text_logit_max:.3g}), "
            f"audio {self.audio_logit_max_error:.4g} (up to {self.audio_logit_max:.3g})",
            f"greedy-token agreement: text {100 * self.text_agreement:.1f} %, "
            f"audio {100 * self.audio_agreement:.1f} %",
        ]


class _Replay:
    """A sampler that returns given tokens in order (teacher forcing)."""

    def __init__(self, tokens: np.ndarray):
        self._tokens = iter(tokens.reshape(-1).tolist())

    def __call__(self, logits: mx.array, key: mx.array | None = None) -> mx.array:
        return mx.array([next(self._tokens)], dtype=mx.int32)


def fixed_input(cfg: ModelConfig, seed: int) -> tuple[np.ndarray, mx.array]:
    """Seeded user tokens (T, num_user_codebooks) and image features (N, vision width)."""
    rng = np.random.default_rng(seed)
    steps = cfg.xa_start + STEPS_WITH_IMAGE
    user = rng.integers(0, cfg.audio_card, size=(steps, cfg.num_user_codebooks))
    features = mx.array(rng.standard_normal((cfg.vision.num_tokens, cfg.vision.width)).astype(np.float32))
    return user, features


def _run(model, user: np.ndarray, features: mx.array, forced: SamplerConfig | None):
    if forced is None:
        stream = Stream(model, features, greedy=True)
    else:  # the replaying samplers keep Python state: no compiled step
        stream = Stream(model, features, sampler=forced, compiled=False)
    text, audio = [], []
    for codes in user:
        out = stream.step(codes)
        text.append(np.array(out.text_logits.astype(mx.float32)))
        audio.append(np.array(out.audio_logits.astype(mx.float32)))
    return np.stack(text), np.stack(audio)


def quality_report(
    quantized: str | Path,
    reference: str | Path,
    config: ModelConfig | None = None,
    *,
    dtype: str = "float32",
    seed: int = DEFAULT_SEED,
) -> QualityReport:
    """Compare checkpoint `quantized` with the unquantized `reference` (any layout).

    The models are loaded one after the other, so memory holds one at a time.
    """
    ref_model = load(reference, dtype=dtype, config=config)
    user, features = fixed_input(ref_model.cfg, seed)
    ref_text, ref_audio = _run(ref_model, user, features, None)
    del ref_model
    gc.collect()
    mx.clear_cache()

    text_tokens = ref_text.argmax(-1)  # (T,)
    audio_tokens = ref_audio.argmax(-1)  # (T, K)
    forced = SamplerConfig(text=_Replay(text_tokens), audio=_Replay(audio_tokens))
    q_text, q_audio = _run(load(quantized, dtype=dtype, config=config), user, features, forced)
    return QualityReport(
        steps=len(user),
        text_logit_max_error=float(np.abs(q_text - ref_text).max()),
        audio_logit_max_error=float(np.abs(q_audio - ref_audio).max()),
        text_logit_max=float(np.abs(ref_text).max()),
        audio_logit_max=float(np.abs(ref_audio).max()),
        text_agreement=float((q_text.argmax(-1) == text_tokens).mean()),
        audio_agreement=float((q_audio.argmax(-1) == audio_tokens).mean()),
    )
