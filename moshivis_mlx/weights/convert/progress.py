"""A one-line progress display on stderr (no dependency).

Redrawn in place on a terminal; when stderr is a file or a pipe only the
final line is printed, so logs stay readable.
"""

from __future__ import annotations

import sys
import time

_REDRAW_SECONDS = 0.1
_GB = 1e9


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressLine:
    def __init__(self, total_bytes: int, label: str, stream=None, interactive: bool | None = None):
        self.total = max(total_bytes, 1)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.done = 0
        self.start = time.monotonic()
        self._last_draw = 0.0

    def update(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.monotonic()
        if self.interactive and now - self._last_draw >= _REDRAW_SECONDS:
            self._last_draw = now
            self.stream.write("\r" + self._line(now))
            self.stream.flush()

    def close(self) -> None:
        self.stream.write(("\r" if self.interactive else "") + self._line(time.monotonic()) + "\n")
        self.stream.flush()

    def _line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        fraction = self.done / self.total
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        return (
            f"{self.label} {100 * fraction:3.0f}% {self.done / _GB:.2f}/{self.total / _GB:.2f} GB "
            f"{rate / 1e6:.0f} MB/s elapsed {_clock(elapsed)} eta {_clock(eta)}"
        )
