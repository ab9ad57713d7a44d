"""The machine a benchmark ran on, as its reports name it."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine() -> str:
    """System, architecture, CPU and core count."""
    return f"{platform.system()} {platform.machine()}, {cpu_name()}, {os.cpu_count()} cores"
