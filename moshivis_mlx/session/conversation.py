"""`Conversation`: talk with MoshiVis about an image, one 80 ms frame at a time.

The command line is a thin layer over this class; apps embed it the same way:

    conv = Conversation.from_pretrained(image=features)
    pcm_out, text = conv.step(pcm_in)   # 1920 float32 samples at 24 kHz in and out

or, to keep up in real time, push frames as they come and take the answers
as they are ready (the Mimi encoder, the model and the Mimi decoder then
work side by side, see `pipeline`):

    conv = Conversation.from_pretrained(image=features, on_frame=play)
    conv.push(pcm_in)                   # returns at once; `play(FrameOutput)` follows

A conversation has no length limit.

Through loudspeakers the microphone also hears the model. Apps that own their
audio callbacks remove that echo before pushing, with an `EchoCanceller`,
pairing each microphone frame with exactly what the speaker played while it
was captured (silence where the output ran dry):

    canceller = EchoCanceller(24000)
    conv.push(canceller.process(mic_frame, played_frame))

One full-duplex stream pairs them by itself (its callback's input and output
blocks); with two streams, `audio.echo.PlaybackHistory` pairs them by timestamps.
`app.live.LiveSession` does both, at any device rate.
"""

from __future__ import annotations

import weakref
from concurrent.futures import Future
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..audio.mimi import StreamingCodec, load_mimi
from ..model.sampling import SamplerConfig
from ..model.text import TextStream, load_tokenizer
from ..weights.hub import DEFAULT_REPO, load_model, resolve_files
from .pipeline import ConversationClosed, FrameListener, FrameOutput, FramePipeline, StageError, TextListener

__all__ = ["Conversation", "ConversationClosed", "FrameOutput", "IncompatibleModelError", "StageError"]


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

    `mimi` is a codec (`moshivis_mlx.load_mimi(path)`) or the path of Mimi's
    checkpoint; the conversation owns it and closes it with itself.
    `tokenizer` is a sentencepiece processor or the path of its `.model`.

    `image` (and `set_image`) takes whatever `model.stream(image=...)` takes:
    SigLIP features (num_tokens, vision_width), an `ImageKV`, None for no
    image, and image inputs as `model.embed_image` accepts them.

    Two ways to talk, not to be mixed in one conversation:
      * `step(pcm)`: one frame in, its answer out, one frame at a time;
      * `push(pcm)` as frames come, and the answers, in order, either to
        `on_frame(FrameOutput)` (called on the conversation's decoder thread;
        keep it short) or from `receive()`. Frames overlap in the stages, so
        the conversation keeps up as long as its slowest stage does.
    Both give the same tokens, text and audio, bit for bit.

    Every method may be called from any thread. Text listeners are called
    with each non-empty piece, in the thread that called `step`/`receive`,
    or on the decoder thread before `on_frame`.
    """

    def __init__(
        self,
        model,
        mimi: StreamingCodec | str | Path,
        tokenizer,
        image=None,
        *,
        sampler: SamplerConfig | None = None,
        greedy: bool = False,
        on_text: TextListener | None = None,
        on_frame: FrameListener | None = None,
    ):
        if isinstance(mimi, (str, Path)):
            mimi = load_mimi(mimi)
        if isinstance(tokenizer, (str, Path)):
            tokenizer = load_tokenizer(tokenizer)
        text = TextStream(tokenizer)
        check_compatible(model.cfg, mimi, text.vocab_size)
        self.model = model
        self.mimi = mimi
        self.sample_rate = mimi.sample_rate
        self.frame_size = mimi.frame_size
        mx.eval(model.parameters())  # nothing lazy may reach the conversation's threads
        image = _evaluated(image)
        self._pipeline = FramePipeline(
            model, mimi, text, lambda: model.stream(image=image, greedy=greedy, sampler=sampler), on_frame
        )
        self._close = weakref.finalize(self, self._pipeline.close)
        if on_text is not None:
            self._pipeline.add_text_listener(on_text)

    @classmethod
    def from_pretrained(
        cls,
        repo: str = DEFAULT_REPO,
        *,
        model: str | Path | None = None,
        mimi: str | Path | None = None,
        tokenizer: str | Path | None = None,
        bits: int | None = None,
        dtype: str = "auto",
        kv_bits="auto",
        image_kv_bits="auto",
        image=None,
        sampler: SamplerConfig | None = None,
        greedy: bool = False,
        on_text: TextListener | None = None,
        on_frame: FrameListener | None = None,
    ) -> "Conversation":
        """Everything from the Hub (or local paths where given), ready to talk.

        `bits` picks the Hub weights: 4, 8 or 16 (bf16); the default is 8 with at
        least 24 GB of memory on a chip fast enough for its step (`weights.hub.default_bits`),
        else 4. `kv_bits` and `image_kv_bits` are `moshivis_mlx.load`'s.
        """
        files = resolve_files(model=model, mimi=mimi, tokenizer=tokenizer, bits=bits, repo=repo)
        return cls(
            load_model(files.model, dtype=dtype, kv_bits=kv_bits, image_kv_bits=image_kv_bits),
            load_mimi(files.mimi),
            load_tokenizer(files.tokenizer),
            image=image,
            sampler=sampler,
            greedy=greedy,
            on_text=on_text,
            on_frame=on_frame,
        )

    # -- talking -----------------------------------------------------------

    def step(self, pcm_in: np.ndarray) -> tuple[np.ndarray, str]:
        """One frame of the user's voice in, one frame of the model's voice and its text out.

        `pcm_in`: `frame_size` (1920) float32 samples at 24 kHz. Returns
        (pcm_out (1920,) float32, text piece, "" most of the time).
        """
        self._pipeline.check_open()  # a closed or failed conversation says so first
        if self._pipeline.has_listener:
            self._pipeline.receive()  # raises: the answers go to on_frame
        if self._pipeline.unreceived:
            raise RuntimeError("step() waits for its own answer: it cannot follow push() with answers pending")
        self.push(pcm_in)
        out = self.receive()
        return out.pcm, out.text

    def push(self, pcm_in: np.ndarray) -> int:
        """Hand one frame (1920 float32 samples) to the conversation and return at once.

        Returns the frame's index. Its answer follows, in order, as a
        `FrameOutput` to `on_frame` or from `receive()`.
        """
        return self._pipeline.push(self._frame(pcm_in))

    def receive(self, timeout: float | None = None) -> FrameOutput:
        """The answer to the oldest pushed frame not received yet (waits for it)."""
        return self._pipeline.receive(timeout)

    @property
    def frames_pushed(self) -> int:
        """Frames pushed since the conversation began (resets do not rewind it)."""
        return self._pipeline.pushed

    @property
    def in_flight(self) -> int:
        """Frames pushed whose answers are not out yet."""
        return self._pipeline.in_flight

    @property
    def steps(self) -> int:
        """Frames answered since the conversation (re)started."""
        return self._pipeline.steps

    @property
    def preparing_image(self) -> bool:
        """A picture is being embedded; `close` waits for it to finish."""
        return self._pipeline.preparing_image

    @property
    def error(self) -> BaseException | None:
        """Why the conversation stopped, if a stage failed."""
        return self._pipeline.error

    def set_image(self, image, *, wait: bool = True) -> Future | None:
        """Talk about another image (None: no image).

        The picture is embedded on a thread of its own. With `wait` (the
        default) this returns once it is embedded, and it applies from the
        next frame pushed. With `wait=False` it returns at once and the
        conversation goes on meanwhile; the picture applies from the first
        frame pushed after it is ready, and the returned future gives that
        frame's index (or the picture's error: the conversation goes on
        with the old one).
        """
        embedded = self._pipeline.prepare_image(_evaluated(image))
        if wait:
            self._pipeline.control("image", embedded.result())
            return None
        applied: Future = Future()

        def swap_in(done: Future) -> None:
            if done.exception() is not None:
                applied.set_exception(done.exception())
                return
            try:
                self._pipeline.control("image", done.result()).add_done_callback(
                    lambda boundary: _copy_outcome(boundary, applied))
            except BaseException as e:  # closed meanwhile
                applied.set_exception(e)

        embedded.add_done_callback(swap_in)
        return applied

    def reset(self) -> None:
        """Start a new conversation (same image, same listeners), after every frame pushed so far."""
        self._pipeline.control("reset").result()

    def close(self) -> None:
        """Finish the frames pushed so far, then stop the conversation's threads and
        its codec (else this happens when the conversation is collected or the
        program ends). Nothing can be pushed after."""
        self._close()

    def _frame(self, pcm_in: np.ndarray) -> np.ndarray:
        frame = np.asarray(pcm_in, np.float32).reshape(-1)
        if frame.shape[0] != self.frame_size:
            raise ValueError(
                f"expected one frame of {self.frame_size} samples at {self.sample_rate} Hz, "
                f"got {np.shape(pcm_in)}"
            )
        return frame

    # -- text --------------------------------------------------------------

    @property
    def transcript(self) -> str:
        """Everything the model said so far, as text."""
        return self._pipeline.transcript

    def add_text_listener(self, listener: TextListener) -> None:
        self._pipeline.add_text_listener(listener)

    def remove_text_listener(self, listener: TextListener) -> None:
        self._pipeline.remove_text_listener(listener)


def _copy_outcome(source: Future, target: Future) -> None:
    if source.exception() is not None:
        target.set_exception(source.exception())
    else:
        target.set_result(source.result())


def _evaluated(image):
    """MLX arrays made by the caller's thread, evaluated there before they cross threads."""
    arrays = [image] if isinstance(image, mx.array) else [getattr(image, "keys", None), getattr(image, "values", None)]
    arrays = [a for a in arrays if isinstance(a, mx.array)]
    if arrays:
        mx.eval(*arrays)
    return image
