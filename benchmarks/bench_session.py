"""Whole-session behaviour: start-up time and memory over a long conversation.

    python benchmarks/bench_session.py random-checkpoint DIR [--layers 2]  # full size, bf16, random (15.4 GB; 4.0 GB with 2 layers)
    python benchmarks/bench_session.py first-frame CHECKPOINT [--dtype bfloat16]
    python benchmarks/bench_session.py memory [--steps 10000] [--checkpoint DIR]

`first-frame` times a fresh process from start to the first delay-aligned
frame of tokens (imports, load, first traces, two steps). `memory` runs a
model for many steps and samples the resident set size: it must stop growing
once the 3000-step window is full. By default the model is the dispatch-bound
configuration (the released depth, vocabularies and context, tiny widths);
`--checkpoint` loads one as a user does (`dtype="auto"`). 10,000 steps of the
released model take ~7.5 hours here, so `random-checkpoint --layers 2` writes
the released widths, vocabularies, depformer and image encoder with 2 of the
32 temporal layers: every buffer of a step at its real size, at ~1 s a step here.
"""

from __future__ import annotations

import os
import time

# Process start, kept across the restart with jemalloc (see moshivis_mlx/cpu/malloc.py): that restart is
# part of what a user waits for.
_STARTED_AT = float(os.environ.setdefault("MOSHIVIS_MLX_BENCH_STARTED_AT", repr(time.time())))
START = time.perf_counter() - (time.time() - _STARTED_AT)

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moshivis_mlx.cpu.blas import use_optimized_blas  # noqa: E402
from moshivis_mlx.cpu.malloc import restart_with_jemalloc  # noqa: E402

restart_with_jemalloc()  # MOSHIVIS_MLX_MALLOC=system measures with glibc's malloc

BLAS = use_optimized_blas()

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

import moshivis_mlx as mv  # noqa: E402
from moshivis_mlx.cpu.platform_path import apply_platform_path, choose_platform_path  # noqa: E402


def rss_mb() -> float:
    """Current resident set size (Linux /proc; falls back to peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def first_frame(checkpoint: str, dtype: str) -> dict:
    model = mv.load(checkpoint, dtype=dtype)
    loaded = time.perf_counter()
    cfg = model.cfg
    features = mx.random.normal((cfg.vision.num_tokens, cfg.vision.width)).astype(model.dtype)
    stream = model.stream(features, sampler=mv.SamplerConfig(seed=0))
    user = np.zeros(cfg.num_user_codebooks, np.int32)
    out = stream.step(user)
    while out.tokens is None:
        out = stream.step(user)
    np.array(out.tokens)
    done = time.perf_counter()
    return {
        "load_s": round(loaded - START, 2),
        "first_frame_s": round(done - START, 2),
        "peak_rss_mb": round(rss_mb()),
    }


def random_checkpoint(directory: str, layers: int | None = None) -> dict:
    """A released-size bf16 checkpoint with random weights (`layers` temporal
    layers, else all 32), written one tensor at a time (memory holds one tensor),
    through the same writer as `convert`."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mlx.utils import tree_flatten

    from moshivis_mlx.weights.convert.converter import write_checkpoint

    cfg = mv.moshika_vis()
    cfg.num_layers = layers or cfg.num_layers
    shapes = {name: p.shape for name, p in tree_flatten(mv.MoshiVis(cfg).parameters())}  # lazy: never computed
    weights = {}
    for i, (name, shape) in enumerate(sorted(shapes.items())):
        if len(shape) > 1:
            weights[name] = (mx.random.normal(shape, key=mx.random.key(i)) * 0.02).astype(mx.bfloat16)
        else:
            weights[name] = mx.ones(shape, mx.bfloat16)
    output, size = write_checkpoint(directory, cfg, weights, None, dtype="bfloat16", force=True)
    return {"checkpoint": str(output), "bytes": size, "seconds": round(time.perf_counter() - START, 1)}


def dispatch_model() -> mv.MoshiVis:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_step import dispatch_config, random_weights

    mx.random.seed(0)
    model = mv.MoshiVis(dispatch_config())
    random_weights(model, mx.float32)
    return apply_platform_path(model, choose_platform_path())  # as `load` does


def memory(steps: int, checkpoint: str | None) -> dict:
    model = mv.load(checkpoint) if checkpoint else dispatch_model()
    cfg = model.cfg
    features = mx.random.normal((cfg.vision.num_tokens, cfg.vision.width)).astype(model.dtype)
    stream = model.stream(features, sampler=mv.SamplerConfig(seed=0))
    user = np.zeros(cfg.num_user_codebooks, np.int32)
    samples = {}
    checkpoints = {t for t in (*range(1000, steps, 1000), cfg.context, steps // 2, steps) if t <= steps}
    for t in range(1, steps + 1):
        out = stream.step(user)
        if out.tokens is not None:
            np.array(out.tokens)
        if t in checkpoints:
            samples[t] = round(rss_mb(), 1)
            print(f"step {t}: {samples[t]} MB, {time.perf_counter() - START:.0f} s", file=sys.stderr, flush=True)
    reference = samples.get(cfg.context, samples[min(samples)])
    return {
        "model": checkpoint or "dispatch-bound",
        "temporal_layers": cfg.num_layers,
        "dim": cfg.dim,
        "rss_mb_at_step": samples,
        "growth_after_context_mb": round(samples[steps] - reference, 1),
        "seconds": round(time.perf_counter() - START),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    rc = sub.add_parser("random-checkpoint")
    rc.add_argument("directory")
    rc.add_argument("--layers", type=int, help="temporal layers (default: the released 32)")
    ff = sub.add_parser("first-frame")
    ff.add_argument("checkpoint")
    ff.add_argument("--dtype", default="bfloat16")
    mem = sub.add_parser("memory")
    mem.add_argument("--steps", type=int, default=10_000)
    mem.add_argument("--checkpoint", help="load this checkpoint (dtype auto) instead of the dispatch-bound model")
    args = ap.parse_args()
    if args.mode == "random-checkpoint":
        result = random_checkpoint(args.directory, args.layers)
    elif args.mode == "first-frame":
        result = first_frame(args.checkpoint, args.dtype)
    else:
        result = memory(args.steps, args.checkpoint)
    result["blas"] = BLAS.library or "bundled reference BLAS"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
