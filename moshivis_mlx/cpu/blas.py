"""An optimized BLAS for MLX on Linux.

MLX's Linux CPU wheel bundles the unoptimized reference BLAS: float32 matmuls
run at a few GFLOP/s, which makes the SigLIP encoder take minutes. Any
CBLAS-compatible BLAS loaded into the process's global symbol scope *before*
`mlx.core` is imported takes over its `cblas_*` calls (the same effect as
`LD_PRELOAD`, without restarting the process), giving 20-50x faster float32
matmuls.

Which one: every Linear of a step multiplies one row, and OpenBLAS 0.3.21
packs the whole weight for each such product unless its small-matrix kernel
takes it (x86-64 cores with AVX-512: SkylakeX, Cooperlake, Sapphire Rapids),
which `cpu.layers.CpuLinear` arranges by splitting the weight into row blocks. So
OpenBLAS is used where the core it picks has that kernel (it also embeds an
image faster: SigLIP 17 s vs 21 s), and BLIS, when installed, everywhere else:
on an AMD Zen core without AVX-512 the full-size float32 depformer takes 625 ms
through OpenBLAS and 252 ms through BLIS. The core is read from a private load
of OpenBLAS that binds nothing for MLX.

This module imports nothing from MLX, so `moshivis_mlx.cpu.blas` can run first.
`python -m moshivis_mlx` and the benchmarks call `use_optimized_blas()`
automatically; `MOSHIVIS_MLX_BLAS=openblas` or `=blis` forces a library,
`=bundled` opts out. Library users call it themselves before importing MLX,
or set `LD_PRELOAD`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

OPT_OUT_VARIABLE = "MOSHIVIS_MLX_BLAS"  # "bundled" keeps MLX's own BLAS; "openblas" or "blis" forces one
CHOICES = ("openblas", "blis", "bundled")
INSTALL_HINT = (
    "install OpenBLAS for much faster float32 matmuls: "
    "`sudo apt-get install libopenblas0-pthread` (Debian/Ubuntu), "
    "`sudo dnf install openblas` (Fedora) or `sudo pacman -S openblas` (Arch)"
)
THREADS_VARIABLE = "BLIS_NUM_THREADS"  # BLIS runs one thread unless told otherwise
_OPTIMIZED_NAMES = ("openblas", "blis", "mkl_rt")


def candidate_paths() -> list[Path]:
    """Where Linux distributions put a CBLAS-compatible OpenBLAS or BLIS, best first."""
    arch = platform.machine()
    multiarch = f"{arch}-linux-gnu"
    paths = [
        Path(f"/usr/lib/{multiarch}/openblas-pthread/libopenblas.so.0"),
        Path(f"/usr/lib/{multiarch}/openblas-openmp/libopenblas.so.0"),
        Path(f"/usr/lib/{multiarch}/libopenblas.so.0"),
        Path("/usr/lib64/libopenblas.so.0"),
        Path("/usr/lib64/libopenblasp.so.0"),
        Path("/usr/lib/libopenblas.so.0"),
        Path(f"/usr/lib/{multiarch}/blis-pthread/libblis.so.4"),
        Path(f"/usr/lib/{multiarch}/blis-openmp/libblis.so.4"),
        Path(f"/usr/lib/{multiarch}/blis-serial/libblis.so.4"),
        Path("/usr/lib64/libblis.so.4"),
    ]
    for name in ("openblas", "blis"):
        found = ctypes.util.find_library(name)
        if found:
            paths.append(Path(found))
    return paths


def installed(kind: str) -> Path | None:
    """The first installed library of `kind` ("openblas" or "blis")."""
    return next((p for p in candidate_paths() if kind in p.name and p.is_absolute() and p.exists()), None)


def requested_blas() -> str:
    """MOSHIVIS_MLX_BLAS, lower-cased; "" (automatic) when unset or not one of CHOICES."""
    wanted = os.environ.get(OPT_OUT_VARIABLE, "").strip().lower()
    if wanted and wanted not in CHOICES:
        print(f"moshivis_mlx: ignoring {OPT_OUT_VARIABLE}={wanted!r} (expected {', '.join(CHOICES)}); "
              "choosing a BLAS automatically", file=sys.stderr)
        return ""
    return wanted


def find_optimized_blas(wanted: str | None = None) -> Path | None:
    """The library `use_optimized_blas` loads: the one asked for (`wanted`, by
    default MOSHIVIS_MLX_BLAS), else OpenBLAS where its small-matrix kernel
    exists, else BLIS, else OpenBLAS."""
    wanted = requested_blas() if wanted is None else wanted
    if wanted in ("openblas", "blis"):
        return installed(wanted)
    openblas, blis = installed("openblas"), installed("blis")
    if openblas is None or blis is None:
        return openblas or blis
    return openblas if has_small_matrix_kernel(private_openblas_core(openblas)) else blis


def private_openblas_core(path: Path) -> str | None:
    """The core OpenBLAS at `path` picks on this CPU. Loaded with RTLD_LOCAL, so a
    library not loaded globally already stays out of MLX's reach."""
    try:
        get_corename = ctypes.CDLL(str(path), mode=os.RTLD_LOCAL).openblas_get_corename
    except (OSError, AttributeError):
        return None
    get_corename.restype = ctypes.c_char_p
    return (get_corename() or b"").decode() or None


def has_small_matrix_kernel(core: str | None) -> bool:
    return core is not None and core.lower() in _SMALL_KERNEL_CORES


@dataclass
class BlasStatus:
    optimized: bool
    library: str | None  # the optimized library in use, if any
    note: str  # one line for people

    def __str__(self) -> str:
        return self.note


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def global_cblas_provider() -> str | None:
    """The library that a `cblas_sgemm` lookup in the global symbol scope finds.

    MLX loads its bundled BLAS privately, so this is None unless another BLAS
    was preloaded or loaded with RTLD_GLOBAL, and that library is what MLX
    binds to. (numpy's OpenBLAS uses prefixed symbols and does not count.)
    """
    try:
        process = ctypes.CDLL(None)
        address = ctypes.cast(process.cblas_sgemm, ctypes.c_void_p)
        info = _DlInfo()
        if process.dladdr(address, ctypes.byref(info)) and info.dli_fname:
            return os.path.abspath(info.dli_fname.decode())
    except (AttributeError, OSError):
        pass
    return None


def loaded_optimized_blas() -> str | None:
    """Path of the optimized BLAS that MLX's matmuls will use, if any (Linux only)."""
    provider = global_cblas_provider()
    if provider and any(key in provider.lower() for key in _OPTIMIZED_NAMES):
        return provider
    return None


def status() -> BlasStatus:
    if sys.platform != "linux":
        return BlasStatus(True, None, "Apple Silicon: MLX uses Accelerate and Metal")
    library = loaded_optimized_blas()
    if library:
        return BlasStatus(True, library, f"optimized BLAS in use: {library}")
    return BlasStatus(False, None, f"MLX is using its slow reference BLAS; {INSTALL_HINT}")


# OpenBLAS's small-matrix kernels (x86-64 builds for SkylakeX and later cores)
# multiply a weight directly when the product has at most 10^6 multiply-adds and
# at most 1,200 output columns; past that, OpenBLAS 0.3.21 first packs the whole
# weight, and a one-row product (every Linear of a step) runs 4-5x slower:
# 8.4 ms for 65536 x 128 in float32 here, 3.2 ms in blocks of 1,024 rows.
_SMALL_KERNEL_CORES = ("skylakex", "cooperlake", "sapphirerapids")
SMALL_KERNEL_MAX_MACS = 1_000_000
SMALL_KERNEL_MAX_COLUMNS = 1_200


@functools.cache
def openblas_core() -> str | None:
    """The core OpenBLAS dispatches to ("Cooperlake", "Haswell"...) when it is MLX's BLAS."""
    library = loaded_optimized_blas()
    if library is None or "openblas" not in library.lower():
        return None
    return private_openblas_core(Path(library))


def small_kernel_columns(inner: int) -> int:
    """The most output columns a one-row product over `inner` values can have
    and stay on OpenBLAS's small-matrix kernel (both of its limits)."""
    return min(SMALL_KERNEL_MAX_COLUMNS, SMALL_KERNEL_MAX_MACS // inner)


def one_row_block_rows(in_features: int, out_features: int) -> int | None:
    """How many weight rows a one-row float32 product should take at a time so
    that each block stays on OpenBLAS's small-matrix kernel; None: no blocks
    (another BLAS, or a product small enough already)."""
    most = small_kernel_columns(in_features)
    if out_features <= most or not has_small_matrix_kernel(openblas_core()):
        return None
    rows = most // 8 * 8
    return rows if rows >= 8 else None


def key_blocks(head_dim: int, num_keys: int) -> int:
    """Into how many equal blocks of keys one query's float32 attention scores
    should be split so that each block's product stays on OpenBLAS's
    small-matrix kernel; 1: no split (another BLAS, or few enough keys).

    A window's keys outgrow that kernel at 1,200 slots: q (1 x 64) times
    3000 keys took 460 us per layer, and 220 us in three blocks of 1000.
    Equal blocks make the split a reshape, not a copy.
    """
    most = small_kernel_columns(head_dim)
    if num_keys <= most or not has_small_matrix_kernel(openblas_core()):
        return 1
    fewest = -(-num_keys // most)
    return next((n for n in range(fewest, 2 * fewest + 1) if num_keys % n == 0), 1)


def use_optimized_blas() -> BlasStatus:
    """Route MLX's matmuls through OpenBLAS (or BLIS) when possible; safe to call anywhere.

    Does nothing on macOS, when opted out through MOSHIVIS_MLX_BLAS=bundled,
    when an optimized BLAS is already loaded, or when `mlx.core` was imported
    already (its symbols are bound then; the returned note says so).
    """
    wanted = requested_blas()
    if sys.platform != "linux" or wanted == "bundled":
        return status()
    if loaded_optimized_blas():
        return status()
    if "mlx.core" in sys.modules:
        current = status()
        current.note += " (mlx was imported before use_optimized_blas(); call it first or set LD_PRELOAD)"
        return current
    path = find_optimized_blas(wanted)
    if path is None:
        current = status()
        if wanted:
            current.note = f"{OPT_OUT_VARIABLE}={wanted}, but no {wanted} library was found; {INSTALL_HINT}"
        return current
    if "blis" in path.name and THREADS_VARIABLE not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        os.environ[THREADS_VARIABLE] = str(os.cpu_count() or 1)  # large products (SigLIP) use every core
    try:
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        return BlasStatus(False, None, f"could not load {path} ({e}); {INSTALL_HINT}")
    return status()


if __name__ == "__main__":
    print(use_optimized_blas())
