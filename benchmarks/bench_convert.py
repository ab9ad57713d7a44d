"""Convert a full-size MoshiVis checkpoint with random weights: wall time and peak memory.

1. Writes a random bf16 checkpoint with exactly the tensor names and shapes of
   the official PyTorch release (from its manifest), streaming, so generating
   it needs little memory (~17 GB of disk).
2. Runs `python -m convert` on it for each requested bit width, each in its
   own process, and reports wall time and that process's peak RSS.
3. Loads each output with `moshivis_mlx.load` (also in its own process) and
   reports the load time and peak RSS; with --quantize-on-load, also loads the
   bf16 file with `bits=N` directly.
Everything is deleted afterwards unless --keep.

    python benchmarks/bench_convert.py --manifest ../shared/reference/moshika-vis-pytorch.manifest.json

Random bf16 values (random sign and mantissa, magnitudes in [2^-7, 2^-6))
stand in for weights: quantization costs the same whatever the values.

Each process loads the optimized system BLAS first, as `python -m moshivis_mlx
convert` does (`moshivis_mlx.cpu.blas`); `--blas bundled` measures with MLX's own BLAS
instead, `--blas both` one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import describe_machine  # noqa: E402  (benchmarks/machine.py)
from moshivis_mlx.cpu.blas import OPT_OUT_VARIABLE  # noqa: E402  (imports nothing from MLX)

_POOL_BYTES = 256 * 2**20  # random bf16 values reused at random offsets
_BF16_SIGN_AND_MANTISSA = 0x807F
_BF16_EXPONENT_2_POW_MINUS_7 = 0x3C00
_CHUNK_BYTES = 64 * 2**20


def _pool(rng: np.random.Generator) -> np.ndarray:
    bits = rng.integers(0, 2**16, size=_POOL_BYTES // 2, dtype=np.uint16)
    return (bits & _BF16_SIGN_AND_MANTISSA) | _BF16_EXPONENT_2_POW_MINUS_7


def write_random_checkpoint(manifest: Path, path: Path, seed: int = 0) -> int:
    """A safetensors file with the manifest's tensors filled with random bf16 values."""
    tensors = json.loads(manifest.read_text())["tensors"]
    header, offset = {}, 0
    for name in sorted(tensors):
        info = tensors[name]
        if info["dtype"] != "BF16":
            raise SystemExit(f"{name}: only BF16 manifests are supported, got {info['dtype']}")
        nbytes = 2 * int(np.prod(info["shape"], dtype=np.int64))
        header[name] = {"dtype": "BF16", "shape": info["shape"], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-(len(raw) + 8) % 8)
    rng = np.random.default_rng(seed)
    pool = _pool(rng)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in sorted(tensors):
            remaining = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
            while remaining:
                n = min(remaining, _CHUNK_BYTES)
                start = int(rng.integers(0, pool.size - n // 2))
                f.write(pool[start : start + n // 2].tobytes())
                remaining -= n
    return path.stat().st_size


_RSS_MARK = "__peak_rss_bytes__"
_RSS_UNIT = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux


def _timed(code: str, blas: str) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in GiB, stdout) of Python `code` run in a fresh process,
    with the optimized system BLAS loaded first unless `blas` is "bundled"."""
    wrapped = (
        "from moshivis_mlx.cpu.blas import use_optimized_blas\n"
        "print('blas:', use_optimized_blas())\n"  # MOSHIVIS_MLX_BLAS=bundled makes it a no-op
        f"{code}\nimport resource\n"
        f"print({_RSS_MARK!r}, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * {_RSS_UNIT})"
    )
    env = dict(os.environ, **({OPT_OUT_VARIABLE: "bundled"} if blas == "bundled" else {}))
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True, env=env)
    wall = time.monotonic() - start
    if done.returncode:
        raise SystemExit(f"benchmark step failed:\n{code}\n{done.stdout}\n{done.stderr}")
    lines = done.stdout.strip().splitlines()
    peak = int(lines[-1].split()[-1])
    return wall, peak / 2**30, "\n".join(lines[:-1])


def _machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{describe_machine()}, {mem:.0f} GiB RAM"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", type=Path, required=True, help="moshika-vis-pytorch.manifest.json")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench_convert"))
    p.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    p.add_argument("--load-dtype", default="bfloat16")
    p.add_argument("--skip-load", action="store_true")
    p.add_argument("--quantize-on-load", action="store_true",
                   help="also time moshivis_mlx.load(bf16 file, bits=N) (quantizing while loading)")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    p.add_argument("--blas", choices=("optimized", "bundled", "both"), default="optimized")
    args = p.parse_args()
    blas_choices = ("optimized", "bundled") if args.blas == "both" else (args.blas,)

    print(f"machine: {_machine()}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    source = args.workdir / "model.safetensors"
    try:
        if not source.exists():
            t = time.monotonic()
            size = write_random_checkpoint(args.manifest, source)
            print(f"generated {source}: {size / 1e9:.2f} GB in {time.monotonic() - t:.0f} s")
        for blas in blas_choices:
            for bits in args.bits:
                out = args.workdir / f"q{bits}"
                argv = [str(source), str(out), f"--bits={bits}", "--force", "--quiet"]
                wall, rss, stdout = _timed(f"from moshivis_mlx.weights.convert.cli import main\nassert main({argv!r}) == 0", blas)
                print(f"convert bf16 -> q{bits}: {wall:.0f} s wall, peak RSS {rss:.2f} GiB")
                print("  " + stdout.strip().replace("\n", "\n  "))
                if not args.skip_load:
                    code = f"import moshivis_mlx as m; m.load({str(out)!r}, dtype={args.load_dtype!r})"
                    wall, rss, _ = _timed(code, blas)
                    print(f"load q{bits} ({args.load_dtype}): {wall:.0f} s wall, peak RSS {rss:.2f} GiB")
                if args.quantize_on_load:
                    code = f"import moshivis_mlx as m; m.load({str(source)!r}, dtype={args.load_dtype!r}, bits={bits})"
                    wall, rss, _ = _timed(code, blas)
                    print(f"load bf16 file with bits={bits} ({args.load_dtype}): {wall:.0f} s wall, peak RSS {rss:.2f} GiB")
                if not args.keep:
                    shutil.rmtree(out)
    finally:
        if not args.keep:
            source.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
