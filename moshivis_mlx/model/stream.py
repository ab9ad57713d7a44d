"""Frame-by-frame generation with the delays of Moshi's token streams.

Stream layout (17 streams): 0 = text, 1..8 = Moshi's codebooks, 9..16 = the
user's. A stream with delay d sees at step t the token of frame t - d; the
first `d + 1` steps of each stream see its initial token instead. All
bookkeeping lives in a small ring of token columns on the device, so a step
never synchronises with the host and a conversation has no length limit.

The model part of a step (temporal transformer, text sampling, depformer) is
one pure function of the step's inputs and the KV window, compiled once per
stream with `mx.compile`: every shape is fixed, so it is traced on the first
step (once more when the cross-attention switches on) and replayed after.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import numpy as np

from .config import TEXT_PADDING_IDS
from .image import ImageSource
from .layers import KVWindow, visible_slots, window_full
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
    # () float32: how much the picture shaped `tokens`' text, the mean cross-attention gate of
    # the last 10 layers (as Kyutai's servers shade words) at the step that sampled it; 0 without
    # an image; None while delays fill. Evaluated with the tokens: reading it costs no extra wait.
    gate: mx.array | None = None


class Stream:
    def __init__(
        self,
        model,
        image: "ImageKV | ImageSource | mx.array | None" = None,
        *,
        greedy: bool = False,
        sampler: SamplerConfig | None = None,
        compiled: bool = True,
    ):
        """`compiled=False` runs the step eagerly: needed for samplers that keep
        Python state between calls, and handy for debugging."""
        cfg = model.cfg
        self.model = model
        self.cfg = cfg
        if greedy and sampler is not None:
            raise ValueError("pass either greedy=True or a sampler, not both")
        self.sampler = SamplerConfig.make_greedy() if greedy else (sampler or SamplerConfig())
        self.compiled = compiled
        self._num_gen = cfg.num_generated_codebooks
        self._delays = np.array(cfg.delays)
        self._user_rows = np.arange(1 + self._num_gen, 1 + cfg.num_audio_codebooks)
        self._ring_len = 2 * cfg.max_delay + 2
        # The user's codebooks grouped by delay: each group is written with one update per step.
        user_delays = self._delays[self._user_rows]
        self._user_groups = [
            (int(d), mx.array(self._user_rows[cb]), mx.array(cb))
            for d in np.unique(user_delays)
            for cb in [np.flatnonzero(user_delays == d)]
        ]
        self._initial = mx.array(
            [cfg.text_initial_token] + [cfg.audio_initial_token] * cfg.num_audio_codebooks, dtype=mx.int32
        )
        s = self.sampler
        self._penalty = (
            RepetitionPenalty(s.repetition_penalty, s.repetition_window, cfg.text_card, TEXT_PADDING_IDS)
            if s.repetition_penalty != 1.0
            else None
        )
        # One function per (image K/V storage or False without the image, visible window slots, window full?).
        self._frame_fns: dict[tuple, Callable] = {}
        self._no_gate = mx.zeros((), mx.float32)  # the gate of a step without the image
        # The text that step t outputs was sampled this many steps earlier: its gate is kept until then.
        self._text_lag = cfg.max_delay - int(self._delays[0])
        self.image: ImageKV | None = None
        self.set_image(image)
        self.reset()

    # -- state -------------------------------------------------------------

    def reset(self) -> None:
        """Forget the conversation (the image stays)."""
        self.offset = 0
        self._gates: collections.deque[mx.array] = collections.deque(maxlen=self._text_lag + 1)
        self._ring = mx.repeat(self._initial[:, None], self._ring_len, axis=1)  # (streams, ring)
        self._window: KVWindow = self.model.transformer.make_cache(self.model.dtype)
        seed = self.sampler.seed
        self._key = mx.random.key(seed if seed is not None else int(np.random.SeedSequence().entropy % 2**63))
        self._recent = self._penalty.initial_recent() if self._penalty is not None else mx.zeros((0,), mx.int32)

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
    def caches(self) -> list[mx.array]:
        """Every array the stream keeps between steps (for memory checks)."""
        return self._window.state + [self._ring, self._recent]

    # -- one frame ---------------------------------------------------------

    def _model_input(self, user_codes: mx.array) -> mx.array:
        t = self.offset
        for delay, rows, codebooks in self._user_groups:
            self._ring[rows, (t + delay) % self._ring_len] = user_codes[codebooks]
        column = self._ring[:, t % self._ring_len]
        still_initial = self._delays >= t  # a stream with delay d waits d + 1 steps
        if still_initial.any():
            column = mx.where(mx.array(still_initial), self._initial, column)
        return column

    def _frame(self, tokens_in, keys, values, offset, key, recent, image, visible, full):
        """The model's work for one frame, as a pure function of arrays."""
        model = self.model
        x = model.embed_tokens(tokens_in)  # (1, dim): one step travels 2-D
        x, keys, values, gate = model.transformer(
            x, keys, values, offset, visible, image, full, self._window.quantization
        )
        temporal_out = model.out_norm(x)  # (1, dim)
        text_logits = model.text_linear(temporal_out)  # (1, text_card)

        # One key per sampler, split apart with one operation (indexing each costs two).
        step_keys = mx.split(mx.random.split(key, 1 + self._num_gen).reshape(-1), 1 + self._num_gen)
        scored = text_logits
        if self._penalty is not None:
            scored = self._penalty.penalize(text_logits, recent)
        text_token = self.sampler.text(scored, step_keys[0])  # (1,)
        if self._penalty is not None:
            recent = self._penalty.remember(recent, text_token, offset)
        audio_tokens, audio_logits = model.depformer(
            temporal_out, text_token, lambda logits, k: self.sampler.audio(logits, step_keys[1 + k])
        )
        outputs = (text_token, audio_tokens, text_logits[0], audio_logits, temporal_out[0], keys, values, recent)
        return outputs if gate is None else (*outputs, gate)  # a compiled function returns arrays only

    def _frame_fn(self, with_image: bool, visible: int, full: bool) -> Callable:
        key = (with_image and (self.image.quantization or "float"), visible, full, self._window.quantization)
        fn = self._frame_fns.get(key)
        if fn is None:
            if with_image:
                image_quantization = self.image.quantization

                def frame(tokens_in, keys, values, offset, key, recent, image_keys, image_values):
                    image = ImageKV(image_keys, image_values, image_quantization)
                    return self._frame(tokens_in, keys, values, offset, key, recent, image, visible, full)
            else:
                def frame(tokens_in, keys, values, offset, key, recent):
                    return self._frame(tokens_in, keys, values, offset, key, recent, None, visible, full)
            fn = mx.compile(frame) if self.compiled else frame
            self._frame_fns[key] = fn
        return fn

    def step(self, user_codes) -> StepOutput:
        """Advance by one 80 ms frame given the user's codes (num_user_codebooks,)."""
        cfg = self.cfg
        user = mx.array(user_codes).astype(mx.int32).reshape(-1)
        if user.shape[0] != cfg.num_user_codebooks:
            raise ValueError(f"expected {cfg.num_user_codebooks} user codes, got shape {tuple(user.shape)}")
        tokens_in = self._model_input(user)
        self._key, key = mx.random.split(self._key)
        inputs = [tokens_in, self._window.keys, self._window.values, mx.array(self.offset), key, self._recent]
        with_image = self.image is not None and self.offset >= cfg.xa_start
        if with_image:
            inputs += [self.image.keys, self.image.values]
        (text_token, audio_tokens, text_logits, audio_logits, temporal_out,
         self._window.keys, self._window.values, self._recent, *gate) = self._frame_fn(
            with_image, visible_slots(self.offset, self._window.size), window_full(self.offset, self._window.size)
        )(*inputs)
        del inputs  # the old window must have no other owner, so its update is done in place
        self._gates.append(gate[0] if gate else self._no_gate)

        self.offset += 1
        self._ring[: 1 + self._num_gen, self.offset % self._ring_len] = mx.concatenate([text_token, audio_tokens])
        frame = None
        if self.offset > cfg.max_delay:
            positions = (self.offset - cfg.max_delay + self._delays[: 1 + self._num_gen]) % self._ring_len
            frame = mx.take_along_axis(self._ring[: 1 + self._num_gen], mx.array(positions)[:, None], axis=1)[:, 0]
        out = StepOutput(
            tokens=frame,
            text_logits=text_logits,
            audio_logits=audio_logits,
            transformer_out=temporal_out,
            input_tokens=tokens_in,
            gate=self._gates[0] if frame is not None else None,
        )
        pending = [text_logits, audio_logits, self._ring, self._recent, self._key, self._gates[-1]] + self._window.state
        mx.async_eval(*pending, *([frame] if frame is not None else []))
        return out
