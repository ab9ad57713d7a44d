"""`WebSession`: one page's conversation, between the websocket and the model.

This is the only place where the web server touches the `Conversation`
(`push`/`receive`, `set_image`, `reset`), so a change of the conversation's
API changes this file alone. A worker thread takes what the page
sent, in order: audio is cut into 80 ms frames and each whole frame is
pushed into the conversation (the page's microphone paces the model, never a
clock here), up to 3 at once so Mimi and the model work side by side;
answers go back as they come. Pictures are embedded off the audio path and
apply from the first frame after they are ready; the page gets its answers
to pictures in the order it sent them. When the machine is slower than real
time, the oldest waiting frames are dropped (and counted) so the lag stays
under `max_lag_seconds`, as live mode does.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ...audio.framing import PendingFrames
from . import protocol

DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024  # a phone photo is a few MB; SigLIP sees 448 x 448
_POLL_SECONDS = 0.05  # worker wait for input when idle (only so that `stop` is noticed)
_RECENT_STEPS = 25  # steps averaged for the real-time factor (2 s)
_WARMUP_STEPS = 2  # compile the step before the first page talks
_MAX_IN_FLIGHT = 3  # frames in the conversation at once: one per stage
_ANSWER_WAIT_SECONDS = 0.01  # worker wait for an answer when nothing else is ready

Send = Callable[[bytes], None]


@dataclass
class SessionConfig:
    max_lag_seconds: float = 0.5  # waiting input beyond this is dropped
    stats_every_steps: int = 6  # a "stats" status about twice a second of audio
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    step_delay: float = 0.0  # debugging aid: pretend the machine is slower


@dataclass
class WebStats:
    seconds: float = 0.0  # the page's connection, set when it ends
    steps: int = 0
    received_seconds: float = 0.0  # audio the page sent
    dropped_frames: int = 0
    lag_seconds: float = 0.0
    max_lag_seconds: float = 0.0
    image_switches: int = 0
    recent_step_seconds: collections.deque = field(default_factory=lambda: collections.deque(maxlen=_RECENT_STEPS))

    def real_time_factor(self, frame_seconds: float) -> float:
        recent = list(self.recent_step_seconds)
        return (sum(recent) / len(recent)) / frame_seconds if recent else 0.0


def warm_up(conversation) -> None:
    """A few silent steps, then forget them: the first page's first steps are not slow."""
    silence = np.zeros(conversation.frame_size, np.float32)
    for _ in range(_WARMUP_STEPS):
        conversation.step(silence)
    conversation.reset()


class WebSession:
    """Runs `conversation` for one page until `stop()`; `send` gets protocol messages
    (it is called from the worker thread and must not block)."""

    def __init__(self, conversation, send: Send, config: SessionConfig | None = None):
        self.conversation = conversation
        self.config = config or SessionConfig()
        self.rate = conversation.sample_rate
        self.frame_size = conversation.frame_size
        self.frame_seconds = self.frame_size / self.rate
        if self.config.max_lag_seconds < self.frame_seconds:
            raise ValueError(f"max lag must be at least one frame ({self.frame_seconds:.2f} s)")
        self.stats = WebStats()
        self.error: BaseException | None = None
        self._send = send
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("audio" | "image" | "refuse" | "reset", value)
        self._pending = PendingFrames(self.frame_size, self.rate)  # audio not yet a whole frame, or waiting
        self._replies: collections.deque = collections.deque()  # to pictures and resets, in the page's order
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._run, name="moshivis-web", daemon=True)

    # -- from the server (any thread) ------------------------------------------------

    def start(self) -> None:
        self._worker.start()

    def stop(self) -> None:
        """Let the worker finish its step, then end (blocks: call it off the event loop)."""
        self._stop.set()
        if self._worker.is_alive():
            self._worker.join()

    def push_audio(self, samples: np.ndarray) -> None:
        self._inbox.put(("audio", samples))

    def request_image(self, data: bytes) -> None:
        """A new picture; too large ones are refused in turn, so answers keep the page's order."""
        if len(data) > self.config.max_image_bytes:
            limit = self.config.max_image_bytes / 2**20
            self._inbox.put(("refuse", f"the picture is {len(data) / 2**20:.1f} MB; the limit is {limit:.0f} MB"))
        else:
            self._inbox.put(("image", data))

    def request_reset(self) -> None:
        self._inbox.put(("reset", None))

    # -- worker ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.conversation.reset()
            self.conversation.set_image(None)  # each page brings its own picture
            self._send(protocol.status("ready", sample_rate=self.rate, frame_size=self.frame_size,
                                       max_image_bytes=self.config.max_image_bytes))
            while not self._stop.is_set():
                self._take_inbox()
                while self.conversation.in_flight < _MAX_IN_FLIGHT and (frame := self._next_frame()) is not None:
                    self.conversation.push(frame)
                    if self.config.step_delay:
                        time.sleep(self.config.step_delay)
                self._take_answers()
                self._answer_pictures()
        except BaseException as e:  # the server reports it and ends the page's connection
            self.error = e
            self._send(protocol.error("internal", f"the conversation stopped: {e}"))

    def _take_inbox(self) -> None:
        """Everything the page sent so far, in order (waits a little when there is nothing to do)."""
        wait = not self._pending.has_frame and not self.conversation.in_flight
        while True:
            try:
                kind, value = self._inbox.get(timeout=_POLL_SECONDS) if wait else self._inbox.get_nowait()
            except queue.Empty:
                return
            wait = False
            if kind == "audio":
                self._pending.append(value)
                self.stats.received_seconds += len(value) / self.rate
            elif kind == "image":
                self._set_image(value)
            elif kind == "refuse":
                self._replies.append(protocol.error("image", value))
            elif kind == "reset":
                self.conversation.reset()
                self._replies.append(protocol.status("reset"))

    def _set_image(self, data: bytes) -> None:
        """Embedded on the conversation's image thread while the talk goes on."""
        try:
            self._replies.append(self.conversation.set_image(data, wait=False))
        except Exception as e:  # a bad picture must not end the conversation
            self._replies.append(protocol.error("image", f"cannot use this picture: {e}"))

    def _answer_pictures(self) -> None:
        """Tell the page how its pictures and resets went, in the order it sent them."""
        while self._replies:
            head = self._replies[0]
            if isinstance(head, bytes):
                self._send(head)
            elif not head.done():
                return
            elif head.exception() is not None:
                self._send(protocol.error("image", f"cannot use this picture: {head.exception()}"))
            else:
                self.stats.image_switches += 1
                self._send(protocol.status("image"))
            self._replies.popleft()

    def _next_frame(self) -> np.ndarray | None:
        """The oldest whole frame, after dropping the oldest ones beyond the lag bound."""
        frame, dropped, lag = self._pending.next_frame(self._lag, self.config.max_lag_seconds)
        if frame is None:
            return None
        self.stats.dropped_frames += dropped
        self.stats.lag_seconds = lag
        self.stats.max_lag_seconds = max(self.stats.max_lag_seconds, lag)
        return frame

    def _lag(self) -> float:
        """Audio received but not answered yet: waiting here or in the conversation."""
        return self._pending.seconds + self.conversation.in_flight * self.frame_seconds

    def _take_answers(self) -> None:
        """Send every answer ready; wait a little for the first while frames are in the conversation."""
        wait = _ANSWER_WAIT_SECONDS if self.conversation.in_flight else 0.0
        while True:
            try:
                out = self.conversation.receive(timeout=wait)
            except TimeoutError:
                return
            wait = 0.0
            stats = self.stats
            stats.recent_step_seconds.append(max(out.stage_seconds.values(), default=0.0))
            stats.steps += 1
            self._send(protocol.audio(out.pcm))
            if out.text:
                self._send(protocol.text(out.text, out.gate))
            if stats.steps % self.config.stats_every_steps == 0:
                self._send(protocol.status(
                    "stats", rtf=round(stats.real_time_factor(self.frame_seconds), 3),
                    lag=round(stats.lag_seconds, 3), dropped=stats.dropped_frames, steps=stats.steps,
                ))
