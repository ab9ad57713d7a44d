"""File mode: a recorded question in, the spoken answer out, as fast as the machine goes."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

DEFAULT_TAIL_SECONDS = 6.0  # silence after the question, for the model to answer
IN_FLIGHT_FRAMES = 3  # one per stage of the conversation keeps every stage busy


@dataclass(frozen=True)
class ImageSwitch:
    """Show `image` from `at_seconds` into the conversation on."""

    at_seconds: float
    image: object


@dataclass
class OfflineResult:
    frames: int
    seconds: float  # of audio produced
    elapsed: float  # wall-clock seconds
    transcript: str

    @property
    def mean_step_seconds(self) -> float:
        return self.elapsed / max(1, self.frames)


def frames_needed(num_samples: int, tail_seconds: float, sample_rate: int, frame_size: int) -> int:
    """Frames covering the input and the tail (the last one zero-padded)."""
    if tail_seconds < 0:
        raise ValueError(f"tail must be >= 0 seconds, got {tail_seconds}")
    total = num_samples + int(round(tail_seconds * sample_rate))
    return max(1, math.ceil(total / frame_size))


def converse_offline(
    conversation,
    pcm: np.ndarray,
    *,
    tail_seconds: float = DEFAULT_TAIL_SECONDS,
    image_switches: Sequence[ImageSwitch] = (),
    on_frame: Callable[[np.ndarray], None] | None = None,
    progress: bool = False,
    in_flight: int = IN_FLIGHT_FRAMES,
) -> OfflineResult:
    """Feed `pcm` (mono, at the conversation's sample rate) and then silence,
    frame by frame; hand every output frame to `on_frame`.

    Up to `in_flight` frames are in the conversation at once, so Mimi and the
    model work side by side; the answer is the same, bit for bit, as one
    frame at a time (`in_flight=1`).
    """
    rate, size = conversation.sample_rate, conversation.frame_size
    pcm = np.asarray(pcm, np.float32).reshape(-1)
    num_frames = frames_needed(len(pcm), tail_seconds, rate, size)
    switches = sorted(image_switches, key=lambda s: s.at_seconds)
    bar = _progress_bar(num_frames, size / rate) if progress else None
    start = time.perf_counter()
    received = 0

    def take_answer() -> None:
        nonlocal received
        out = conversation.receive()
        received += 1
        if on_frame is not None:
            on_frame(out.pcm)
        if bar is not None:
            bar.update(1)

    try:
        for index in range(num_frames):
            now = index * size / rate
            while switches and switches[0].at_seconds <= now:
                conversation.set_image(switches.pop(0).image)  # applies from this frame on
            frame = pcm[index * size : (index + 1) * size]
            if len(frame) < size:
                frame = np.pad(frame, (0, size - len(frame)))
            while index - received >= max(1, in_flight):
                take_answer()
            conversation.push(frame)
        while received < num_frames:
            take_answer()
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - start
    return OfflineResult(num_frames, num_frames * size / rate, elapsed, conversation.transcript)


def _progress_bar(total: int, frame_seconds: float):
    from tqdm.auto import tqdm

    # Counted in seconds of audio, so the rate reads as speed relative to real time.
    return tqdm(total=total, unit="s", unit_scale=frame_seconds, desc="answering", dynamic_ncols=True, disable=None)
