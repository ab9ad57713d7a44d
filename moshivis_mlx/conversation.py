"""`Conversation`: talk with MoshiVis about an image, one 80 ms frame at a time.

The command line is a thin layer over this class; apps embed it the same way:

    conv = Conversation.from_pretrained(image=features)
    pcm_out, text = conv.step(pcm_in)   # 1920 float32 samples at 24 kHz in and out

Each step encodes the user's frame with Mimi, runs one model step, and
decodes the model's 8 audio codes back to speech. It synchronises with the
device once (to read the sampled tokens). A conversation has no length limit.

MLX streams belong to the thread that made them, so every MLX and Mimi call
of a conversation runs on one private thread; `step`, `set_image` and
`reset` hand their work to it and wait, whichever thread calls them.
"""

from __future__ import annotations

import queue
import threading
import weakref
from concurrent.futures import Future
from pathlib import Path
from typing import Callable

import mlx.core as mx
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


class _OwnThread:
    """Runs callables on one dedicated thread, one at a time (calls from that
    thread itself run inline, so nothing can deadlock).

    MLX needs `mx.clear_streams()` at the end of every thread that used it
    (else the process may abort at exit): the thread does that when it stops,
    on `close()`, when collected, or at interpreter exit, whichever comes first.
    """

    def __init__(self, name: str):
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=_serve, args=(self._tasks,), name=name, daemon=True)
        self._thread.start()
        self._stop = weakref.finalize(self, _stop_serving, self._tasks, self._thread)

    def run(self, fn, *args):
        if threading.current_thread() is self._thread:
            return fn(*args)
        if not self._stop.alive:
            raise RuntimeError("this conversation was closed")
        future: Future = Future()
        self._tasks.put((future, fn, args))
        return future.result()

    def close(self) -> None:
        self._stop()


def _serve(tasks: queue.SimpleQueue) -> None:
    while (task := tasks.get()) is not None:
        future, fn, args = task
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # handed to the caller
                future.set_exception(e)
        del task, future, fn, args  # hold nothing between tasks, so the conversation can be collected
    mx.clear_streams()


def _stop_serving(tasks: queue.SimpleQueue, thread: threading.Thread) -> None:
    tasks.put(None)
    if thread is not threading.current_thread():
        thread.join()


class Conversation:
    """A live, spoken conversation with a MoshiVis model about an image.

    `mimi` is a codec (`moshivis_mlx.mimi.load_mimi(path)`) or the path of
    Mimi's checkpoint; `tokenizer` a sentencepiece processor or the path of
    its `.model` file.

    `image` (and `set_image`) takes whatever `model.stream(image=...)` takes:
    SigLIP features (num_tokens, vision_width), an `ImageKV`, None for no
    image, and image inputs as `model.embed_image` accepts them.

    Thread safety: `step`, `set_image` and `reset` may be called from any
    thread; they run one at a time on the conversation's own thread. Text
    listeners are called in the thread that called `step`, with each
    non-empty piece of text.
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
    ):
        if isinstance(mimi, (str, Path)):
            mimi = load_mimi(mimi)
        if isinstance(tokenizer, (str, Path)):
            tokenizer = load_tokenizer(tokenizer)
        self._text = TextStream(tokenizer)
        check_compatible(model.cfg, mimi, self._text.vocab_size)
        self.model = model
        self.mimi = mimi
        self.sample_rate = mimi.sample_rate
        self.frame_size = mimi.frame_size
        self._listeners_lock = threading.Lock()
        self._listeners: list[TextListener] = [on_text] if on_text is not None else []
        self._pieces: list[str] = []
        self.steps = 0
        # [web, issue 19] The gate of the last text piece (see `StepOutput.gate`): 0 = the picture
        # played no part. Set by `_step` with the text, so read it right after `step` returns text.
        self.last_gate = 0.0
        mx.eval(model.parameters())  # nothing lazy may reach the conversation's thread
        self._thread = _OwnThread("moshivis-conversation")
        image = _evaluated(image)
        self._stream = self._thread.run(lambda: model.stream(image=image, greedy=greedy, sampler=sampler))

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
            load_model(files.model, dtype=dtype),
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
        pcm_out, text = self._thread.run(self._step, frame)
        if text:
            with self._listeners_lock:
                listeners = list(self._listeners)
            for listener in listeners:
                listener(text)
        return pcm_out, text

    def _step(self, frame: np.ndarray) -> tuple[np.ndarray, str]:
        codes = self.mimi.encode(frame)
        out = self._stream.step(codes)
        if out.tokens is None:  # the first step only fills the delays
            pcm_out, text = np.zeros(self.frame_size, np.float32), ""
        else:
            tokens = np.array(out.tokens)  # the step's one synchronisation
            text = self._text.piece(tokens[0])
            if text:  # [web, issue 19] evaluated with the tokens: no second wait
                self.last_gate = out.gate.item()
            pcm_out = self.mimi.decode(tokens[1:])
        self.steps += 1
        if text:
            self._pieces.append(text)
        return pcm_out, text

    def set_image(self, image) -> None:
        """Talk about another image from the next step on (None: no image)."""
        self._thread.run(self._stream.set_image, _evaluated(image))

    def reset(self) -> None:
        """Start a new conversation (same image, same listeners)."""
        self._thread.run(self._reset)

    def _reset(self) -> None:
        self._stream.reset()
        self.mimi.reset()
        self._text.reset()
        self._pieces.clear()
        self.steps = 0

    def close(self) -> None:
        """Stop the conversation's thread (else it stops when the conversation
        is collected or the program ends). The conversation cannot step after."""
        self._thread.close()

    # -- text --------------------------------------------------------------

    @property
    def transcript(self) -> str:
        """Everything the model said so far, as text."""
        return "".join(list(self._pieces))

    def add_text_listener(self, listener: TextListener) -> None:
        with self._listeners_lock:
            self._listeners.append(listener)

    def remove_text_listener(self, listener: TextListener) -> None:
        with self._listeners_lock:
            self._listeners.remove(listener)


def _evaluated(image):
    """MLX arrays made by the caller's thread, evaluated there before they cross threads."""
    arrays = [image] if isinstance(image, mx.array) else [getattr(image, "keys", None), getattr(image, "values", None)]
    arrays = [a for a in arrays if isinstance(a, mx.array)]
    if arrays:
        mx.eval(*arrays)
    return image
