"""`python -m moshivis_mlx web` in a child process, for the web tests."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from talk_support import interruptible

ROOT = Path(__file__).resolve().parent.parent
HANG_GUARD_SECONDS = 180  # only against hangs: no assertion depends on time


class Server:
    """`python -m moshivis_mlx web` in a child process; its stderr is collected."""

    def __init__(self, args: list[str]):
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moshivis_mlx", "web", "--no-browser", "--port", "0", *args],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            preexec_fn=interruptible,
        )
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()
        self.url = self.wait_for_line(r"open (http://\S+) ").group(1)

    def _pump(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)

    def wait_for_line(self, pattern: str, count: int = 1) -> re.Match:
        deadline = time.monotonic() + HANG_GUARD_SECONDS
        while True:
            matches = [m for line in list(self.lines) if (m := re.search(pattern, line))]
            if len(matches) >= count:
                return matches[count - 1]
            if self.process.poll() is not None and not self._pump_thread.is_alive():  # all its lines are in
                raise AssertionError(f"the server ended ({self.process.returncode}): {''.join(self.lines)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"never printed {pattern!r}: {''.join(self.lines)}")
            time.sleep(0.05)

    def wait_until_free(self) -> None:
        """Every page that started a conversation has ended it (the next one will not be told 'busy')."""
        started = sum("a page started a conversation" in line for line in list(self.lines))
        if started:
            self.wait_for_line("the conversation ended", count=started)

    def interrupt(self) -> int:
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(HANG_GUARD_SECONDS)
