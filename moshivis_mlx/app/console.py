"""The terminal side of live mode: transcript, one-line status, typed image paths.

On a terminal the last line shows the status (real-time factor, lag, drops)
followed by the sentence being spoken; finished lines scroll up. Elsewhere
(a pipe, a log file) the transcript is written as it comes, without status.
"""

from __future__ import annotations

import shlex
import shutil
import sys
import threading
from pathlib import Path
from typing import Callable, TextIO
from urllib.parse import unquote, urlparse

_CLEAR_LINE = "\r\x1b[K"
_MIN_TEXT_WIDTH = 20
NO_IMAGE_WORDS = ("none", "off")  # typed instead of a path: stop looking at any picture


class LiveDisplay:
    def __init__(self, out: TextIO | None = None):
        self.out = out or sys.stdout
        self.interactive = self.out.isatty()
        self._line = ""  # transcript text not yet on a finished line
        self._status = ""
        self._lock = threading.Lock()

    def text(self, piece: str) -> None:
        with self._lock:
            if self.interactive:
                self._line += piece
                self._draw()
            else:
                self._line += piece
                self.out.write(piece)
                self.out.flush()

    def message(self, line: str) -> None:
        """A line of its own above the status (an image switch, a warning)."""
        with self._lock:
            if self.interactive:
                self.out.write(f"{_CLEAR_LINE}[{line}]\n")
                self._draw()
            else:
                self.out.write(("\n" if self._line else "") + f"[{line}]\n")
                self._line = ""
                self.out.flush()

    def status(self, status: str) -> None:
        with self._lock:
            self._status = status
            if self.interactive:
                self._draw()

    def finish(self) -> None:
        """Leave the cursor on a fresh line."""
        with self._lock:
            if self.interactive:
                self.out.write(_CLEAR_LINE + self._line.strip() + "\n" if self._line.strip() else _CLEAR_LINE)
            elif self._line:
                self.out.write("\n")
            self._line = ""
            self.out.flush()

    def _draw(self) -> None:
        width = shutil.get_terminal_size((100, 24)).columns - 1
        while len(self._line) > width:  # full lines scroll up, wrapped at a space
            cut = self._line.rfind(" ", 0, width)
            cut = cut if cut > 0 else width
            self.out.write(_CLEAR_LINE + self._line[:cut] + "\n")
            self._line = self._line[cut:].lstrip(" ")
        prefix = f"[{self._status}] " if self._status else ""
        room = max(_MIN_TEXT_WIDTH, width - len(prefix))
        self.out.write(_CLEAR_LINE + prefix + self._line[-room:])  # the line's end, beside the status
        self.out.flush()


def parse_typed_path(line: str) -> str | None:
    """A path typed or dragged into the terminal: quoted, backslash-escaped or a
    file:// URL, as terminals paste them. None for an empty line."""
    text = line.strip()
    if not text:
        return None
    if text.startswith("file://"):
        return unquote(urlparse(text).path)
    try:
        parts = shlex.split(text)
    except ValueError:  # unbalanced quote: take the line as it is
        parts = [text]
    return parts[0] if len(parts) == 1 else text


class TypedImageReader:
    """Reads lines from stdin in a daemon thread; each path goes to `on_image`."""

    def __init__(self, on_path: Callable[[str | None, str], None], stream: TextIO | None = None):
        self._on_path = on_path
        self._stream = stream if stream is not None else sys.stdin
        self._thread = threading.Thread(target=self._run, name="moshivis-stdin", daemon=True)

    def start(self) -> None:
        if self._stream is not None and not self._stream.closed:
            self._thread.start()

    def _run(self) -> None:
        try:
            for line in self._stream:
                path = parse_typed_path(line)
                if path is None:
                    continue
                if path.lower() in NO_IMAGE_WORDS:
                    self._on_path(None, "no image")
                else:
                    self._on_path(str(Path(path).expanduser()), path)
        except (OSError, ValueError):  # stdin closed under us: nothing more to read
            return
