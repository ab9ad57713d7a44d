"""`python -m moshivis_mlx [options]` talks; `python -m moshivis_mlx convert ...` (or `moshivis-mlx-convert ...`)
converts checkpoints; `python -m moshivis_mlx doctor` says what this machine will do."""

from __future__ import annotations

import sys

CONVERT_COMMAND = "convert"
DOCTOR_COMMAND = "doctor"


def main(argv: list[str] | None = None) -> int:
    argv = _start(argv)
    if argv and argv[0] == CONVERT_COMMAND:
        return _convert(argv[1:])
    if argv and argv[0] == DOCTOR_COMMAND:  # before app/cli.py, which needs MLX: doctor reports a missing MLX
        from .app.doctor import main as doctor_main

        return doctor_main(argv[1:])
    from .app.cli import main as talk_main

    return talk_main(argv)


def convert(argv: list[str] | None = None) -> int:
    """`moshivis-mlx-convert ...` and `python -m convert ...`: the same as `python -m moshivis_mlx convert ...`."""
    return _convert(_start(argv))


def _start(argv: list[str] | None) -> list[str]:
    """What every command does first; returns its arguments."""
    from .cpu.blas import use_optimized_blas
    from .cpu.malloc import restart_with_jemalloc

    if argv is None:  # started as a program, not called: it may restart with jemalloc (see cpu/malloc.py)
        restart_with_jemalloc()
    use_optimized_blas()  # on Linux, before MLX is imported (see cpu/blas.py)
    return sys.argv[1:] if argv is None else list(argv)


def _convert(argv: list[str]) -> int:
    from .weights.convert.cli import main as convert_main

    return convert_main(argv)


if __name__ == "__main__":
    sys.exit(main())
