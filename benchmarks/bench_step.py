"""Per-step speed of the streaming generator.

    python benchmarks/bench_step.py dispatch        # full depth, tiny widths: overhead-bound
    python benchmarks/bench_step.py full [--no-image] [--dtype bfloat16]

`dispatch` keeps the released model's depth (32 temporal layers with the
cross-attention active on 1024 image tokens from step 0, 8 depformer steps x 6
layers, full vocabularies, context 3000) but tiny widths, so the time per step
is almost entirely per-operation overhead, as on a GPU. `full` uses the
released shapes with random weights. Both consume one step at a time the way a
client does: one host read of the tokens per step.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moshivis_mlx.blas import use_optimized_blas  # noqa: E402

BLAS = use_optimized_blas()  # MOSHIVIS_MLX_BLAS=bundled measures without it

import mlx.core as mx  # noqa: E402

import moshivis_mlx as mv  # noqa: E402


def dispatch_config() -> mv.ModelConfig:
    return mv.ModelConfig(
        dim=128,
        num_heads=2,
        ffn_hidden=128,
        gate_hidden=64,
        xa_start=0,
        depformer=mv.DepformerConfig(dim=64, num_layers=6, num_heads=2, ffn_hidden=128, num_steps=8),
        vision=mv.VisionConfig(width=192, num_layers=1, num_heads=2, mlp_hidden=192),
    )


def random_weights(model: mv.MoshiVis, dtype: mx.Dtype) -> None:
    from mlx.utils import tree_flatten, tree_unflatten

    params = [
        (k, (mx.random.normal(v.shape) * 0.02).astype(dtype) if v.ndim > 1 else mx.ones(v.shape, dtype))
        for k, v in tree_flatten(model.parameters())
    ]
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())


def count_ops(stream: mv.Stream, user: np.ndarray) -> int:
    """Nodes of one step's graph, from mx.export_to_dot with evaluation held back."""
    real_async_eval = mx.async_eval
    mx.async_eval = lambda *a, **k: None
    try:
        out = stream.step(user)
    finally:
        mx.async_eval = real_async_eval
    with tempfile.NamedTemporaryFile("r", suffix=".dot") as f:
        outputs = [out.text_logits, out.audio_logits] + ([out.tokens] if out.tokens is not None else [])
        mx.export_to_dot(f.name, *outputs)
        text = f.read()
    mx.eval(outputs)
    # Operation nodes are drawn as rectangles; arrays as ovals.
    return sum(1 for line in text.splitlines() if "shape=rectangle" in line or "shape=box" in line)


def time_steps(stream: mv.Stream, user: np.ndarray, steps: int, warmup: int) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds per step (CPU time is robust to other load on the machine)."""
    for _ in range(warmup):
        np.array(stream.step(user).text_logits.astype(mx.float32))
    wall, cpu = [], []
    for _ in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = stream.step(user)
        np.array(out.tokens)  # the client's single host sync per step
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["dispatch", "full"])
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    ap.add_argument("--no-image", action="store_true")
    ap.add_argument("--eager", action="store_true", help="run the step uncompiled")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args()

    if args.mode == "dispatch":
        cfg, dtype, steps, warmup = dispatch_config(), args.dtype or "float32", args.steps or 200, args.warmup or 20
    else:
        cfg, dtype, steps, warmup = mv.moshika_vis(), args.dtype or "bfloat16", args.steps or 20, args.warmup or 2
    mx.random.seed(0)
    model = mv.MoshiVis(cfg)
    random_weights(model, getattr(mx, dtype))
    image = None if args.no_image else mx.random.normal((cfg.vision.num_tokens, cfg.vision.width))
    stream = mv.Stream(model, image, sampler=mv.SamplerConfig(seed=0), compiled=not args.eager)
    user = np.zeros(cfg.num_user_codebooks, np.int32)

    ops = count_ops(stream, user)
    times, cpu_times = time_steps(stream, user, steps, warmup)
    result = {
        "mode": args.mode,
        "dtype": dtype,
        "image": image is not None,
        "compiled": not args.eager,
        "median_ms": round(1000 * statistics.median(times), 2),
        "p90_ms": round(1000 * float(np.percentile(times, 90)), 2),
        "median_cpu_ms": round(1000 * statistics.median(cpu_times), 2),
        "steps": steps,
        "ops_per_step": ops,
        "peak_rss_mb": round(peak_rss_mb()),
        "machine": f"{platform.machine()} {platform.system()} mlx {mx.__version__} {mx.default_device()}",
        "blas": BLAS.library or "bundled reference BLAS",
    }
    print(json.dumps(result) if args.json else "\n".join(f"{k:>14}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
