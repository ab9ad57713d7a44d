"""Large products spread over the CPU's cores, one MLX CPU stream per core.

MLX runs the CPU operations of a stream one after the other on that stream's
single thread, and its own kernels (bf16, float16 and quantized products) use
no other thread. On a CPU, a full-size step multiplies one row by 15 GB of
bf16 weights on one core however many the machine has. Each extra MLX CPU
stream brings a thread of its own, so a product split by output rows, one
block per stream, runs on every core: a 4096 x 22528 bf16 product takes 55 ms
on one stream here and 28 ms on two, a 4-bit one 60 ms and 30 ms. Every output
column is the same dot product either way, so the results are bit-identical.

Float32 products reach the BLAS, which has threads of its own; only the
blocks that OpenBLAS runs on its single-threaded small-matrix kernel (see
`blas.one_row_block_rows`) are spread as well.

`MOSHIVIS_MLX_CPU_STREAMS=1` keeps every product on one stream; another number
sets how many streams are used (default: one per core this process may use).
"""

from __future__ import annotations

import functools
import os
import sys
from typing import TypeVar

import mlx.core as mx

T = TypeVar("T")

STREAMS_VARIABLE = "MOSHIVIS_MLX_CPU_STREAMS"
# Below this many weights a product takes well under a millisecond on one
# core, and the hand-over between streams would cost more than it saves.
MIN_SPLIT_WEIGHTS = 1 << 20


@functools.cache
def usable_cores() -> int:
    """Read once: `cpu_streams` asks at every product that may be spread."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def requested_streams() -> int:
    """How many CPU streams to use: MOSHIVIS_MLX_CPU_STREAMS, else one per usable core."""
    value = os.environ.get(STREAMS_VARIABLE, "").strip()
    if value:
        try:
            count = int(value)
            if count >= 1:
                return count
        except ValueError:
            pass
        _warn_ignored(value)
    return usable_cores()


@functools.cache
def _warn_ignored(value: str) -> None:
    """Once per value: the variable is read at every product that may be spread."""
    print(f"moshivis_mlx: ignoring {STREAMS_VARIABLE}={value!r} (expected a whole number >= 1)", file=sys.stderr)


@functools.cache
def _extra_streams(count: int) -> tuple[mx.ThreadLocalStream, ...]:
    # Thread-local: each thread that runs a model gets streams (and threads) of its own.
    return tuple(mx.new_thread_local_stream(mx.cpu) for _ in range(count))


def cpu_streams() -> tuple[mx.ThreadLocalStream | None, ...]:
    """The streams a product is spread over; None, first, is the default stream.

    Just the default stream where products do not run on the CPU (a GPU is
    the default device) or when one stream is requested.
    """
    if mx.default_device() != mx.cpu:
        return (None,)
    return (None,) + _extra_streams(requested_streams() - 1)


def on_streams(items: list[T]) -> list[tuple[T, mx.ThreadLocalStream | None]]:
    """Each item paired with the next of `cpu_streams()` in turn, the default stream first."""
    streams = cpu_streams()
    return [(item, streams[i % len(streams)]) for i, item in enumerate(items)]


def split_rows(out_features: int, in_features: int, parts: int, multiple: int = 8) -> list[tuple[int, int]] | None:
    """(start, stop) rows for each of at most `parts` streams, in multiples of
    `multiple` rows (weight rows; or attention heads, with the keys and values
    of one head as its "in_features"); None when the product is too small to
    gain from being spread."""
    if parts < 2 or out_features * in_features < MIN_SPLIT_WEIGHTS or out_features < multiple * parts:
        return None
    step = ((out_features + parts - 1) // parts + multiple - 1) // multiple * multiple
    bounds = [(start, min(start + step, out_features)) for start in range(0, out_features, step)]
    return bounds if len(bounds) > 1 else None
