"""Token sampling for the text stream and the audio codebooks.

Order of operations, as in the official Moshi code: logits are divided by the
temperature first, then top-k and top-p filter the tempered distribution, then
one token is drawn. Filters come from `mlx_lm.sample_utils`. Randomness comes
from explicit PRNG keys, so a seeded stream is reproducible whatever else uses
`mx.random` in the process.

`mlx_lm.sample_utils` depends on nothing but MLX, but importing it through
the package runs `mlx_lm/__init__.py`, which pulls in `transformers` (and torch
where installed: ~5 s before the first sampled token) and edits `os.environ`.
So the module file is loaded on its own, on first use; if that ever stops
working, the normal import is the fallback.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import mlx.core as mx
import mlx.nn as nn


@functools.cache
def _sample_utils() -> ModuleType:
    spec = importlib.util.find_spec("mlx_lm")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "sample_utils.py"
        file_spec = importlib.util.spec_from_file_location("moshivis_mlx._mlx_lm_sample_utils", path)
        if file_spec is not None and file_spec.loader is not None:
            module = importlib.util.module_from_spec(file_spec)
            try:
                file_spec.loader.exec_module(module)
                return module
            except ImportError:
                pass
    from mlx_lm import sample_utils

    return sample_utils


@dataclass(frozen=True)
class TokenSampler:
    """How to draw one token from logits; temperature 0 means argmax."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def __call__(self, logits: mx.array, key: mx.array | None = None) -> mx.array:
        """logits (B, V) -> tokens (B,) int32."""
        if self.greedy:
            return mx.argmax(logits, axis=-1).astype(mx.int32)
        if 0 < self.top_k < logits.shape[-1] and self.top_p == 1.0:
            return self._draw_among_top_k(logits, key)
        logprobs = nn.log_softmax(logits.astype(mx.float32) / self.temperature)
        if 0 < self.top_k < logits.shape[-1]:
            logprobs = _sample_utils().apply_top_k(logprobs, self.top_k)
        if self.top_p < 1.0:
            logprobs = _sample_utils().apply_top_p(logprobs, self.top_p)
        return mx.random.categorical(logprobs, axis=-1, key=key).astype(mx.int32)

    def _draw_among_top_k(self, logits: mx.array, key: mx.array | None) -> mx.array:
        """The same distribution as masking all but the k best and drawing from
        the whole vocabulary, at a fraction of the cost: the noise is drawn for
        k values instead of 32,000, and no normalisation is needed. The draw is
        Gumbel-max, `argmax(l / T + G)`, exactly a draw from softmax(l / T) and
        4 operations where `mx.random.categorical` builds 11."""
        scaled = logits.astype(mx.float32) / self.temperature
        last = scaled.shape[-1] - self.top_k  # the k best end up after the partition point
        best = mx.argpartition(scaled, kth=last, axis=-1)[..., last:]
        values = mx.take_along_axis(scaled, best, axis=-1)
        choice = mx.argmax(values + mx.random.gumbel(values.shape, key=key), axis=-1)
        return mx.take_along_axis(best, choice[..., None], axis=-1)[..., 0].astype(mx.int32)


@dataclass(frozen=True)
class SamplerConfig:
    """Sampling of a whole stream. Defaults are what Kyutai's web client sends."""

    text: TokenSampler = TokenSampler(temperature=0.45, top_k=25)
    audio: TokenSampler = TokenSampler(temperature=0.7, top_k=250)
    # Penalise recently generated text tokens (padding excluded); 1.0 = off.
    repetition_penalty: float = 1.0
    repetition_window: int = 64
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.repetition_window < 1:
            raise ValueError(f"repetition_window must be >= 1, got {self.repetition_window}")

    @classmethod
    def make_greedy(cls) -> "SamplerConfig":
        return cls(text=TokenSampler(), audio=TokenSampler())


class RepetitionPenalty:
    """Sign-aware penalty on the text tokens of the last `window` steps.

    The recent tokens live in a device array that the caller threads through
    the step (`penalize`, then `remember`), so a compiled step stays pure.
    Padding tokens are stored as an extra, never-sampled column: the text
    stream is mostly padding, and penalising it would make the model talk
    non-stop.
    """

    def __init__(self, penalty: float, window: int, vocab: int, padding_ids: tuple[int, ...]):
        self.vocab = vocab
        self.window = window
        self.padding_ids = mx.array(padding_ids, dtype=mx.int32)
        self._apply = _sample_utils().make_repetition_penalty(penalty, window)

    def initial_recent(self) -> mx.array:
        return mx.full((self.window,), self.vocab, dtype=mx.int32)

    def penalize(self, logits: mx.array, recent: mx.array) -> mx.array:
        extended = mx.concatenate([logits, mx.zeros((logits.shape[0], 1), logits.dtype)], axis=-1)
        return self._apply(recent, extended)[:, : self.vocab]

    def remember(self, recent: mx.array, token: mx.array, step: mx.array) -> mx.array:
        is_padding = (token[:, None] == self.padding_ids).any(axis=-1)
        entry = mx.where(is_padding, self.vocab, token)
        return mx.slice_update(recent, entry, (step % self.window).reshape(1), axes=(0,))
