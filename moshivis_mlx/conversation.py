"""`Conversation`: talk with MoshiVis about an image, one 80 ms frame at a time.

The command line is a thin layer over this class; apps embed it the same way:

    conv = Conversation.from_pretrained(image=features)
    pcm_out, text = conv.step(pcm_in)   # 1920 float32 samples at 24 kHz in and out

Each step encodes the user's frame with Mimi, runs one model step, and
decodes the model's 8 audio codes back to speech. It synchronises with the
device once (to read the sampled tokens). A conversation has no length limit.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

import numpy as np

from .hub import DEFAULT_REPO, load_model, resolve_files
from .mimi import StreamingCodec, load_mimi
from .sampling import SamplerConfig
from .text import TextStream, load_tokenizer

TextListener = Callable[[str], None]


class IncompatibleModelError(ValueError):
    """The model, the codec and the tokenizer do not speak the same vocabularies."""


def check_compatible(cfg, codec: StreamingCodec, text_vocab_size: int) -> None:
    """Refuse combinations that would index outside an embedding table."""
    if cfg.audio_card != codec.codebook_size:
        raise IncompatibleModelError(
            f"the model's audio vocabulary has {cfg.audio_card} codes per codebook, but the codec "
            f"(Mimi) emits codes 0..{codec.codebook_size - 1}: this checkpoint was not made for Mimi"
        )
    if cfg.num_user_codebooks != codec.num_codebooks or cfg.num_generated_codebooks != codec.num_codebooks:
        raise IncompatibleModelError(
            f"the model hears {cfg.num_user_codebooks} and speaks {cfg.num_generated_codebooks} codebooks, "
            f"but the codec was opened with {codec.num_codebooks}"
        )
    if text_vocab_size < cfg.text_card:
        raise IncompatibleModelError(
            f"the text tokenizer has {text_vocab_size} pieces but the model writes {cfg.text_card} "
            "different text tokens: use the tokenizer that came with the model"
        )


class Conversation:
    """A live, spoken conversation with a MoshiVis model about an image.

    `image` (and `set_image`) takes whatever `model.stream(image=...)` takes:
    SigLIP features (num_tokens, vision_width), an `ImageKV`, None for no
    image, and image inputs as `model.embed_image` accepts them.

    Thread safety: `step`, `set_image` and `reset` may be called from
    different threads; they run one at a time. Text listeners are called in
    the thread that runs `step`, with each non-empty piece of text.
    """

    def __init__(
        self,
        model,
        mimi: StreamingCodec,
        tokenizer,
        image=None,
        *,
        sampler: SamplerConfig | None = None,
        greedy: bool = False,
        on_text: TextListener | None = None,
    ):
        self._text = TextStream(tokenizer)
        check_compatible(model.cfg, mimi, self._text.vocab_size)
        self.model = model
        self.mimi = mimi
        self.sample_rate = mimi.sample_rate
        self.frame_size = mimi.frame_size
        self._lock = threading.RLock()
        self._listeners: list[TextListener] = [on_text] if on_text is not None else []
        self._stream = model.stream(image=image, greedy=greedy, sampler=sampler)
        self._pieces: list[str] = []
        self.steps = 0

    @classmethod
    def from_pretrained(
        cls,
        repo: str = DEFAULT_REPO,
        *,
        model: str | Path | None = None,
        mimi: str | Path | None = None,
        tokenizer: str | Path | None = None,
        bits: int | None = None,
        dtype: str = "bfloat16",
        image=None,
        sampler: SamplerConfig | None = None,
        greedy: bool = False,
        on_text: TextListener | None = None,
    ) -> "Conversation":
        """Everything from the Hub (or local paths where given), ready to talk.

        `bits` picks the Hub weights: 4, 8 or 16 (bf16); the default is 8 on
        machines with at least 24 GB of memory, else 4.
        """
        files = resolve_files(model=model, mimi=mimi, tokenizer=tokenizer, bits=bits, repo=repo)
        return cls(
            load_model(files.model, dtype=dtype, bits=files.bits),
            load_mimi(files.mimi),
            load_tokenizer(files.tokenizer),
            image=image,
            sampler=sampler,
            greedy=greedy,
            on_text=on_text,
        )

    # -- talking -----------------------------------------------------------

    def step(self, pcm_in: np.ndarray) -> tuple[np.ndarray, str]:
        """One frame of the user's voice in, one frame of the model's voice and its text out.

        `pcm_in`: `frame_size` (1920) float32 samples at 24 kHz. Returns
        (pcm_out (1920,) float32, text piece, "" most of the time).
        """
        frame = np.asarray(pcm_in, np.float32).reshape(-1)
        if frame.shape[0] != self.frame_size:
            raise ValueError(
                f"expected one frame of {self.frame_size} samples at {self.sample_rate} Hz, "
                f"got {np.shape(pcm_in)}"
            )
        with self._lock:
            codes = self.mimi.encode(frame)
            out = self._stream.step(codes)
            if out.tokens is None:  # the first step only fills the delays
                pcm_out, text = np.zeros(self.frame_size, np.float32), ""
            else:
                tokens = np.array(out.tokens)  # the step's one synchronisation
                text = self._text.piece(tokens[0])
                pcm_out = self.mimi.decode(tokens[1:])
            self.steps += 1
            if text:
                self._pieces.append(text)
                for listener in list(self._listeners):
                    listener(text)
        return pcm_out, text

    def set_image(self, image) -> None:
        """Talk about another image from the next step on (None: no image)."""
        with self._lock:
            self._stream.set_image(image)

    def reset(self) -> None:
        """Start a new conversation (same image, same listeners)."""
        with self._lock:
            self._stream.reset()
            self.mimi.reset()
            self._text.reset()
            self._pieces.clear()
            self.steps = 0

    # -- text --------------------------------------------------------------

    @property
    def transcript(self) -> str:
        """Everything the model said so far, as text."""
        with self._lock:
            return "".join(self._pieces)

    def add_text_listener(self, listener: TextListener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def remove_text_listener(self, listener: TextListener) -> None:
        with self._lock:
            self._listeners.remove(listener)
