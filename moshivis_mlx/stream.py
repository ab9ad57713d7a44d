"""Frame-by-frame generation with the delays of Moshi's token streams.

Stream layout (17 streams): 0 = text, 1..8 = Moshi's codebooks, 9..16 = the
user's. A stream with delay d sees at step t the token of frame t - d; the
first `d + 1` steps of each stream see its initial token instead. All
bookkeeping lives in a small ring of token columns on the device, so a step
never synchronises with the host and a conversation has no length limit.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .config import TEXT_PADDING_IDS
from .image import ImageSource
from .sampling import RepetitionPenalty, SamplerConfig
from .temporal import ImageKV


@dataclass
class StepOutput:
    """What one step produced. Arrays are evaluated asynchronously: reading one
    (e.g. `np.array(out.tokens)`) is the step's single host synchronisation."""

    tokens: mx.array | None  # (1 + num_generated,) delay-aligned frame; None while delays fill
    text_logits: mx.array  # (text_card,) of this step
    audio_logits: mx.array  # (num_generated, audio_card) of this step
    transformer_out: mx.array  # (dim,) normed temporal output: input of both heads
    input_tokens: mx.array  # (1 + num_audio_codebooks,) what the temporal transformer embedded


class Stream:
    def __init__(
        self,
        model,
        image: "ImageKV | ImageSource | mx.array | None" = None,
        *,
        greedy: bool = False,
        sampler: SamplerConfig | None = None,
    ):
        cfg = model.cfg
        self.model = model
        self.cfg = cfg
        if greedy and sampler is not None:
            raise ValueError("pass either greedy=True or a sampler, not both")
        self.sampler = SamplerConfig.make_greedy() if greedy else (sampler or SamplerConfig())
        self._num_gen = cfg.num_generated_codebooks
        self._num_streams = 1 + cfg.num_audio_codebooks
        delays = np.array(cfg.delays)
        self._delays = delays
        self._user_rows = np.arange(1 + self._num_gen, self._num_streams)
        self._ring_len = 2 * cfg.max_delay + 2
        self._initial = mx.array(
            [cfg.text_initial_token] + [cfg.audio_initial_token] * cfg.num_audio_codebooks, dtype=mx.int32
        )
        self.image: ImageKV | None = None
        self.set_image(image)
        self.reset()

    # -- state -------------------------------------------------------------

    def reset(self) -> None:
        """Forget the conversation (the image stays)."""
        dtype = self.model.dtype
        self.offset = 0
        self._ring = mx.repeat(self._initial[:, None], self._ring_len, axis=1)  # (streams, ring)
        self._temporal_cache = self.model.transformer.make_cache(dtype)
        self._depformer_cache = self.model.depformer.make_cache(dtype)
        seed = self.sampler.seed
        self._key = mx.random.key(seed if seed is not None else int(np.random.SeedSequence().entropy % 2**63))
        s = self.sampler
        self._penalty = (
            RepetitionPenalty(s.repetition_penalty, s.repetition_window, self.cfg.text_card, TEXT_PADDING_IDS)
            if s.repetition_penalty != 1.0
            else None
        )

    def set_image(self, image: "ImageKV | ImageSource | mx.array | None", *, reset: bool = False) -> None:
        """Use this image from the next step on; None turns vision off.

        `image` is anything `MoshiVis.embed_image` accepts (an ImageKV, a file
        path, bytes, a PIL.Image, a uint8 array (H, W, 3) or SigLIP features
        (N, width)). The conversation so far is kept unless `reset` is True.
        """
        self.image = None if image is None else self.model.embed_image(image)
        if reset:
            self.reset()

    @property
    def caches(self) -> list:
        return self._temporal_cache + self._depformer_cache

    # -- one frame ---------------------------------------------------------

    def _model_input(self, user_codes: mx.array) -> mx.array:
        t = self.offset
        user_delays = self._delays[self._user_rows]
        for d in np.unique(user_delays):
            codebooks = np.flatnonzero(user_delays == d)
            rows = self._user_rows[codebooks]
            self._ring[mx.array(rows), (t + int(d)) % self._ring_len] = user_codes[mx.array(codebooks)]
        column = self._ring[:, t % self._ring_len]
        still_initial = self._delays >= t  # a stream with delay d waits d + 1 steps
        if still_initial.any():
            column = mx.where(mx.array(still_initial), self._initial, column)
        return column

    def step(self, user_codes) -> StepOutput:
        """Advance by one 80 ms frame given the user's codes (num_user_codebooks,)."""
        cfg = self.cfg
        user = mx.array(user_codes).astype(mx.int32).reshape(-1)
        if user.shape[0] != cfg.num_user_codebooks:
            raise ValueError(f"expected {cfg.num_user_codebooks} user codes, got shape {tuple(user.shape)}")
        t = self.offset
        tokens_in = self._model_input(user)
        x = self.model.embed_tokens(tokens_in[None, None, :])  # (1, 1, dim)
        image = self.image if (self.image is not None and t >= cfg.xa_start) else None
        x = self.model.transformer(x, self._temporal_cache, image)
        temporal_out = self.model.out_norm(x[:, 0])  # (1, dim)
        text_logits = self.model.text_linear(temporal_out)  # (1, text_card)

        self._key, text_key, audio_key = mx.random.split(self._key, 3)
        audio_keys = mx.random.split(audio_key, self._num_gen)
        penalised = self._penalty(text_logits) if self._penalty is not None else text_logits
        text_token = self.sampler.text(penalised, text_key)  # (1,)
        if self._penalty is not None:
            self._penalty.record(text_token)
        keys = iter(audio_keys)
        audio_tokens, audio_logits = self.model.depformer(
            temporal_out, text_token, lambda logits: self.sampler.audio(logits, next(keys)), self._depformer_cache
        )

        self.offset = t + 1
        self._ring[: 1 + self._num_gen, self.offset % self._ring_len] = mx.concatenate([text_token, audio_tokens])
        frame = None
        if self.offset > cfg.max_delay:
            positions = (self.offset - cfg.max_delay + self._delays[: 1 + self._num_gen]) % self._ring_len
            frame = mx.take_along_axis(self._ring[: 1 + self._num_gen], mx.array(positions)[:, None], axis=1)[:, 0]
        out = StepOutput(
            tokens=frame,
            text_logits=text_logits[0],
            audio_logits=audio_logits,
            transformer_out=temporal_out[0],
            input_tokens=tokens_in,
        )
        pending = [out.text_logits, out.audio_logits, self._ring] + [c for cache in self._temporal_cache for c in cache.state]
        if frame is not None:
            pending.append(frame)
        if self._penalty is not None:
            pending.append(self._penalty.recent)
        mx.async_eval(*pending)
        return out
