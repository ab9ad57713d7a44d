"""The machinery of a conversation: three stages on three threads, side by side.

    push(pcm) -> [encode: Mimi] -> [model: one MoshiVis step] -> [decode: Mimi] -> FrameOutput

Each stage is a thread with an inbox; a frame moves to the next stage as soon
as its stage is done with it, so while the model computes step t the decoder
turns step t-1 into audio and the encoder reads frame t+1. The frame period
is the slowest stage's time, not the sum, and a frame never waits for a
clock: its latency is the sum of the stages. The model stage synchronises
with the device once per step (to read the sampled tokens for the decoder).

Controls (`image`, `reset`) travel through the same inboxes as the frames,
so each applies at a defined frame boundary: every frame pushed before it is
answered with the old state, every frame after with the new one. A picture
is embedded on a fourth thread (SigLIP takes seconds on a CPU) and enters
the stream only when it is ready, so the audio never stops for it.

MLX streams belong to the thread that made them: the model stage owns the
model's stream and the image thread its own; both release MLX's per-thread
state (`mx.clear_streams`) when they stop.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx
import numpy as np

from ..model.text import TextStream

FrameListener = Callable[["FrameOutput"], None]
TextListener = Callable[[str], None]


class ConversationClosed(RuntimeError):
    """The conversation was closed: it takes no more frames or requests."""


class StageError(RuntimeError):
    """A stage of the conversation failed; its exception is the `__cause__`."""


@dataclass
class FrameOutput:
    """One frame of the model's answer."""

    index: int  # frames pushed before this one, since the conversation began (resets do not rewind it)
    pcm: np.ndarray  # (frame_size,) float32: the model's voice
    text: str  # the text piece it wrote at this step ("" most of the time)
    pcm_in: np.ndarray  # (frame_size,) float32: the user's frame this step heard
    pushed_at: float  # time.perf_counter() when the frame was pushed
    done_at: float  # ... and when its answer was ready
    stage_seconds: dict[str, float]  # time each stage spent on it
    # How much the picture shaped `text` (`StepOutput.gate`: the mean cross-attention gate of the
    # last 10 layers); 0 without a picture or without text. The web page shades words by it.
    gate: float = 0.0

    @property
    def latency(self) -> float:
        return self.done_at - self.pushed_at


@dataclass
class _Frame:
    index: int
    pcm_in: np.ndarray
    pushed_at: float
    codes: np.ndarray | None = None  # the user's codes (encoder)
    audio_codes: np.ndarray | None = None  # the model's codes (model); None while its delays fill
    text: str = ""
    gate: float = 0.0
    pcm: np.ndarray | None = None
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class _Control:
    kind: str  # "image", "reset" or "call"
    payload: object = None
    future: Future = field(default_factory=Future)
    boundary: int = 0  # the first frame it applies to


@dataclass
class _Failed:
    error: BaseException
    stage: str


_STOP = object()


class _Stage:
    """A thread that handles its inbox in order and hands every item on."""

    def __init__(self, name: str, on_frame: Callable, on_control: Callable, forward: Callable,
                 at_exit: Callable[[], None] | None = None):
        self.name = name
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._on_frame, self._on_control, self._forward, self._at_exit = on_frame, on_control, forward, at_exit
        self._thread = threading.Thread(target=self._serve, name=f"moshivis-{name}", daemon=True)
        self._thread.start()

    def put(self, item) -> None:
        self._inbox.put(item)

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _serve(self) -> None:
        failed: _Failed | None = None
        try:
            while (item := self._inbox.get()) is not _STOP:
                if isinstance(item, _Failed):
                    failed = failed or item
                elif failed is not None:  # after a failure nothing is handled, but no caller may hang
                    if isinstance(item, _Control):
                        item.future.set_exception(StageError(f"the conversation's {failed.stage} stage failed"))
                    continue
                else:
                    try:
                        start = time.perf_counter()
                        if isinstance(item, _Frame):
                            self._on_frame(item)
                            item.seconds[self.name] = time.perf_counter() - start
                        else:
                            self._on_control(item)
                    except BaseException as e:  # handed downstream, then to the caller
                        failed = item = _Failed(e, self.name)
                self._forward(item)
                del item
            self._forward(_STOP)
        finally:
            if self._at_exit is not None:
                self._at_exit()


class FramePipeline:
    """The stages of one conversation and the order of everything through them.

    Holds no reference to the `Conversation` that fronts it, so a dropped
    conversation can be collected (its finalizer closes the pipeline).
    """

    def __init__(self, model, codec, text: TextStream, make_stream: Callable[[], object],
                 on_frame: FrameListener | None = None):
        self.model = model
        self.codec = codec
        self.frame_size = codec.frame_size
        self._text = text
        self._on_frame = on_frame
        self._text_listeners: list[TextListener] = []
        self._lock = threading.Lock()  # frame numbering, closing, listeners
        self._progress = threading.Condition(self._lock)
        self._next_index = 0  # frames pushed
        self._delivered = 0  # frames answered
        self._received = 0  # answers taken by `receive`
        self._closed = False
        self._images_pending = 0  # pictures handed to the image thread and not embedded yet
        self.error: BaseException | None = None
        self.steps = 0  # frames answered since the conversation (re)started
        self._pieces: list[str] = []
        self._outputs: queue.SimpleQueue = queue.SimpleQueue()
        self._decoder = _Stage("decode", self._decode, _ignore, self._deliver)
        self._model_stage = _Stage("model", self._step, self._model_control, self._decoder.put, mx.clear_streams)
        self._encoder = _Stage("encode", self._encode, self._encoder_control, self._model_stage.put)
        self._images = _Stage("image", _ignore, _run_call, _ignore, mx.clear_streams)
        self._stream = self.call_on_model(make_stream)

    # -- requests --------------------------------------------------------------

    def push(self, pcm: np.ndarray) -> int:
        """Queue one frame; returns its index. Never blocks."""
        with self._lock:
            self.check_open()
            index = self._next_index
            self._next_index += 1
            self._encoder.put(_Frame(index, pcm, time.perf_counter()))
        return index

    def control(self, kind: str, payload=None) -> Future:
        """Send `kind` down the pipeline after every frame pushed so far; the
        future gives the index of the first frame it applies to."""
        item = _Control(kind, payload)
        with self._lock:
            self.check_open()
            item.boundary = self._next_index
            self._encoder.put(item)
        return item.future

    def call_on_model(self, fn: Callable[[], object]):
        """Run `fn` on the model's thread, between two frames, and wait for its result."""
        item = _Control("call", fn)
        with self._lock:
            self.check_open()
            self._model_stage.put(item)
        return item.future.result()

    def prepare_image(self, image) -> Future:
        """The picture's K/V, computed on the image thread; the future gives the ImageKV."""
        item = _Control("call", lambda: None if image is None else self.model.embed_image(image))
        with self._lock:
            self.check_open()
            self._images_pending += 1
            self._images.put(item)
        item.future.add_done_callback(self._image_done)
        return item.future

    def _image_done(self, _future: Future) -> None:
        with self._lock:
            self._images_pending -= 1

    @property
    def preparing_image(self) -> bool:
        """A picture is being embedded (closing waits for it: MLX work cannot be interrupted)."""
        return self._images_pending > 0

    def receive(self, timeout: float | None = None) -> FrameOutput:
        """The next answered frame, in order (when no `on_frame` listener takes them)."""
        if self._on_frame is not None:  # nothing would ever come: the listener takes every answer
            raise RuntimeError("this conversation hands its answers to on_frame: receive() and step() are not used")
        try:
            item = self._outputs.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no frame answered within {timeout} s") from None
        if isinstance(item, _Failed):
            self._outputs.put(item)  # every later call reports it too
            raise StageError(f"the conversation's {item.stage} stage failed: {item.error}") from item.error
        if item is _STOP:
            self._outputs.put(item)
            raise ConversationClosed("this conversation was closed")
        with self._lock:
            self._received += 1
        self._tell_listeners(item.text)
        return item

    @property
    def pushed(self) -> int:
        """Frames pushed since the conversation began: the index the next frame will get."""
        return self._next_index

    @property
    def in_flight(self) -> int:
        """Frames pushed and not answered yet."""
        return self._next_index - self._delivered

    @property
    def has_listener(self) -> bool:
        """Answers go to `on_frame`, not to `receive`."""
        return self._on_frame is not None

    @property
    def unreceived(self) -> int:
        """Frames pushed whose answers `receive` has not returned yet."""
        return self._next_index - self._received

    def close(self, timeout: float = 30.0) -> None:
        """Let the stages finish what they hold, then stop them and the codec."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._progress.notify_all()
        self._images.put(_STOP)
        self._encoder.put(_STOP)
        for stage in (self._encoder, self._model_stage, self._decoder, self._images):
            stage.join(timeout)
        close_codec = getattr(self.codec, "close", None)
        if close_codec is not None:
            close_codec()

    @property
    def threads_alive(self) -> bool:
        return any(s.alive for s in (self._encoder, self._model_stage, self._decoder, self._images))

    # -- listeners -------------------------------------------------------------

    def add_text_listener(self, listener: TextListener) -> None:
        with self._lock:
            self._text_listeners.append(listener)

    def remove_text_listener(self, listener: TextListener) -> None:
        with self._lock:
            self._text_listeners.remove(listener)

    @property
    def transcript(self) -> str:
        with self._lock:
            return "".join(self._pieces)

    def _tell_listeners(self, text: str) -> None:
        if text:
            with self._lock:
                listeners = list(self._text_listeners)
            for listener in listeners:
                listener(text)

    # -- stages (each runs on its own thread) ----------------------------------

    def _encode(self, frame: _Frame) -> None:
        frame.codes = self.codec.encode(frame.pcm_in)

    def _encoder_control(self, item: _Control) -> None:
        if item.kind == "reset":  # the codec is reset between frames, once everything before is answered
            with self._progress:
                self._progress.wait_for(lambda: self._delivered >= item.boundary or self.error is not None
                                        or self._closed)
            if self.error is None:
                self.codec.reset()

    def _step(self, frame: _Frame) -> None:
        out = self._stream.step(frame.codes)
        if out.tokens is not None:  # None while the delays fill (the first step)
            tokens = np.array(out.tokens)  # the step's one synchronisation
            frame.text = self._text.piece(tokens[0])
            if frame.text:  # evaluated with the tokens: no second wait
                frame.gate = out.gate.item()
            frame.audio_codes = tokens[1:]

    def _model_control(self, item: _Control) -> None:
        if item.kind == "call":
            _run_call(item)
        elif item.kind == "image":
            self._stream.set_image(item.payload)
        elif item.kind == "reset":
            self._stream.reset()
            self._text.reset()

    def _decode(self, frame: _Frame) -> None:
        if frame.audio_codes is None:
            frame.pcm = np.zeros(self.frame_size, np.float32)
        else:
            frame.pcm = self.codec.decode(frame.audio_codes)

    def _deliver(self, item) -> None:
        """The end of the line (decoder's thread): answers out, controls done."""
        if isinstance(item, _Frame):
            output = FrameOutput(item.index, item.pcm, item.text, item.pcm_in, item.pushed_at,
                                 time.perf_counter(), item.seconds, item.gate)
            if self._on_frame is not None:
                try:
                    self._tell_listeners(output.text)
                    self._on_frame(output)
                except BaseException as e:  # the app's listener failed: the conversation stops, as for a stage
                    self._deliver(_Failed(e, "on_frame listener"))
            with self._progress:
                self.steps += 1
                if item.text:
                    self._pieces.append(item.text)
                self._delivered += 1
                self._progress.notify_all()
            if self._on_frame is None:
                self._outputs.put(output)
        elif isinstance(item, _Control):
            if item.kind == "reset":
                with self._progress:
                    self.steps = 0
                    self._pieces.clear()
            if not item.future.done():
                item.future.set_result(item.boundary)
        elif isinstance(item, _Failed):
            with self._progress:
                self.error = item.error
                self._progress.notify_all()
            self._outputs.put(item)
        elif item is _STOP:
            self._outputs.put(_STOP)

    def check_open(self) -> None:
        """Raises `ConversationClosed`, or `StageError` after a failure."""
        if self._closed:
            raise ConversationClosed("this conversation was closed")
        if self.error is not None:
            raise StageError(f"the conversation stopped: {self.error}") from self.error


def _run_call(item: _Control) -> None:
    if item.kind == "call" and item.future.set_running_or_notify_cancel():
        try:
            item.future.set_result(item.payload())
        except BaseException as e:  # handed to the caller
            item.future.set_exception(e)


def _ignore(_item) -> None:
    pass
