"""jemalloc for MLX's CPU backend on Linux.

On a CPU, MLX allocates every intermediate array with malloc on the thread that
builds the graph and frees most of them on the thread that computes it. glibc's
per-thread arenas then lock, consolidate and hand chunks back across threads
on every step: a quarter of a dispatch-bound step here (22-24 ms with glibc,
17.5 ms with jemalloc, `benchmarks/bench_step.py dispatch`).

A process's allocator is fixed when it starts (LD_PRELOAD), so it cannot be
switched from inside like the BLAS (see blas.py). `python -m moshivis_mlx` and
the benchmarks therefore restart themselves once, with jemalloc preloaded, when
it is installed (Debian/Ubuntu: `libjemalloc2`) and not loaded already. Set
`MOSHIVIS_MLX_MALLOC=system` to keep glibc's malloc. A library user who wants
the same starts Python with `LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2`.

This module imports nothing from MLX.
"""

from __future__ import annotations

import ctypes.util
import os
import platform
import sys
from pathlib import Path

OPT_OUT_VARIABLE = "MOSHIVIS_MLX_MALLOC"  # "system" keeps glibc's malloc
_RESTARTED_VARIABLE = "MOSHIVIS_MLX_MALLOC_RESTARTED"  # set in the restarted process: never loop
INSTALL_HINT = "install jemalloc for faster steps on a CPU: `sudo apt-get install libjemalloc2` (Debian/Ubuntu)"


def find_jemalloc() -> Path | None:
    multiarch = f"{platform.machine()}-linux-gnu"
    candidates = [
        Path(f"/usr/lib/{multiarch}/libjemalloc.so.2"),
        Path("/usr/lib64/libjemalloc.so.2"),
        Path("/usr/lib/libjemalloc.so.2"),
    ]
    found = ctypes.util.find_library("jemalloc")
    if found:
        candidates.append(Path(found))
    return next((path for path in candidates if path.is_absolute() and path.exists()), None)


def jemalloc_loaded() -> bool:
    try:
        return "libjemalloc" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def restart_with_jemalloc() -> None:
    """Replace this process by the same command with jemalloc preloaded, when it
    is installed and not in use yet; otherwise return and change nothing.

    Call it first thing in a program's entry point (nothing has run that a
    restart would repeat), never from library code.
    """
    if sys.platform != "linux" or os.environ.get(OPT_OUT_VARIABLE, "").lower() == "system":
        return
    if os.environ.get(_RESTARTED_VARIABLE) or jemalloc_loaded():
        return
    path = find_jemalloc()
    if path is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(p for p in (str(path), env.get("LD_PRELOAD", "")) if p)
    env[_RESTARTED_VARIABLE] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:
        return  # could not restart: go on with glibc's malloc


def status() -> str:
    if sys.platform != "linux":
        return "not Linux: the system allocator is used"
    if jemalloc_loaded():
        return "jemalloc in use"
    if os.environ.get(OPT_OUT_VARIABLE, "").lower() == "system":
        return f"glibc malloc ({OPT_OUT_VARIABLE}=system)"
    return f"glibc malloc; {INSTALL_HINT}" if find_jemalloc() is None else "glibc malloc (jemalloc installed, not loaded)"


if __name__ == "__main__":
    print(status())
