"""`python -m moshivis_mlx [options]` talks; `python -m moshivis_mlx convert ...` converts checkpoints;
`python -m moshivis_mlx doctor` says what this machine will do."""

from __future__ import annotations

import sys

CONVERT_COMMAND = "convert"
DOCTOR_COMMAND = "doctor"


def main(argv: list[str] | None = None) -> int:
    from .blas import use_optimized_blas
    from .malloc import restart_with_jemalloc

    if argv is None:  # started as a program, not called: it may restart with jemalloc (see malloc.py)
        restart_with_jemalloc()
    use_optimized_blas()  # on Linux, before MLX is imported (see blas.py)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == CONVERT_COMMAND:
        try:
            from convert.cli import main as convert_main
        except ImportError as e:
            if e.name not in ("convert", "convert.cli"):
                raise
            print("error: the `convert` command is not installed with this copy of moshivis_mlx "
                  f"({e}); reinstall the package (pip install -e .)", file=sys.stderr)
            return 1
        return convert_main(argv[1:])
    if argv and argv[0] == DOCTOR_COMMAND:  # before cli.py, which needs MLX: doctor reports a missing MLX
        from .doctor import main as doctor_main

        return doctor_main(argv[1:])
    from .cli import main as talk_main

    return talk_main(argv)


if __name__ == "__main__":
    sys.exit(main())
