"""Audio waiting to become whole frames, with the lag bound live mode and the web page share.

When the machine is slower than real time, audio piles up: the oldest whole
frames are dropped (and counted by the caller) so that what is heard but not
yet answered stays under a bound, the newest always kept.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np


class PendingFrames:
    """Samples at the conversation's rate that are not yet a whole frame, or wait for room."""

    def __init__(self, frame_size: int, rate: int):
        self.frame_size = frame_size
        self.frame_seconds = frame_size / rate
        self.rate = rate
        self.samples = np.zeros(0, np.float32)

    def append(self, samples: np.ndarray) -> None:
        self.samples = np.concatenate([self.samples, samples])

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.rate

    @property
    def has_frame(self) -> bool:
        return len(self.samples) >= self.frame_size

    def next_frame(self, lag: Callable[[], float], max_lag: float) -> tuple[np.ndarray | None, int, float]:
        """The oldest whole frame, after dropping the oldest ones while `lag()` exceeds `max_lag`
        (never the last whole one); how many were dropped; and `lag()` after dropping, frame included."""
        whole = len(self.samples) // self.frame_size
        if whole == 0:
            return None, 0, 0.0
        dropped = 0
        excess = lag() - max_lag
        if excess > 0:
            dropped = min(whole - 1, math.ceil(excess / self.frame_seconds))
            self.samples = self.samples[dropped * self.frame_size :]
        lag_now = lag()
        frame, self.samples = self.samples[: self.frame_size], self.samples[self.frame_size :]
        return frame, dropped, lag_now
