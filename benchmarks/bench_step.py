"""Per-step speed of the streaming generator.

    python benchmarks/bench_step.py dispatch [--start-step 3000]  # full depth, tiny widths: overhead-bound
    python benchmarks/bench_step.py full [--no-image] [--dtype bfloat16] [--bits 4|8]
    python benchmarks/bench_step.py depformer [--depformer-dtype bfloat16]
    python benchmarks/bench_step.py attention [--dtype float32]   # window and image attention, float vs quantized
    python benchmarks/bench_step.py products    # the products each weight lever of issue 21 changes

`dispatch` keeps the released model's depth (32 temporal layers with the
cross-attention active on 1024 image tokens from step 0, 8 depformer steps x 6
layers, full vocabularies, context 3000) but tiny widths, so the time per step
is almost entirely per-operation overhead, as on a GPU. `full` uses the
released shapes with random weights, the image on from step 0, then the same
conversation without it; `--components` times each part alone, reading the
whole 3000-slot window. Both consume one step at a time the way a client does:
one host read of the tokens per step. `attention` times what the cache
levers change, at released sizes: one step's self-attention over a full
3000-slot window and its cross-attention over 1024 image tokens, for all 32
layers, with the keys and values float or quantized. `depformer` times the full-size
depformer alone (8 codebooks, default audio sampler): 1.3 GB of weights
instead of 15 GB, so the compute-dtype choice can be checked in a minute.
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

from moshivis_mlx.cpu.blas import use_optimized_blas  # noqa: E402
from moshivis_mlx.cpu.malloc import restart_with_jemalloc, status as malloc_status  # noqa: E402

restart_with_jemalloc()  # MOSHIVIS_MLX_MALLOC=system measures with glibc's malloc

BLAS = use_optimized_blas()  # MOSHIVIS_MLX_BLAS=bundled measures without it

import mlx.core as mx  # noqa: E402

import moshivis_mlx as mv  # noqa: E402
from moshivis_mlx.cpu.cores import cpu_streams  # noqa: E402
from moshivis_mlx.model.layers import visible_slots  # noqa: E402
from moshivis_mlx.weights.loading import float32_parts_dtype  # noqa: E402
from moshivis_mlx.cpu.platform_path import CPU, apply_platform_path, choose_platform_path  # noqa: E402

PATH = choose_platform_path()  # as `load` chooses it (MOSHIVIS_MLX_FORCE_GPU_PATH=1: what a GPU runs)


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


def random_weights(model, dtype: mx.Dtype) -> None:
    """Random weights of `dtype` for any MLX module (ours or upstream's); norms get ones."""
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


def time_pipelined(stream: mv.Stream, user: np.ndarray, steps: int) -> float:
    """Median seconds per step with the next step queued before this one is read
    (what a file-mode client can do: the graph of t+1 is built while t computes)."""
    wall = []
    pending = stream.step(user)
    for _ in range(steps):
        start = time.perf_counter()
        following = stream.step(user)
        np.array(pending.tokens)
        pending = following
        wall.append(time.perf_counter() - start)
    np.array(pending.tokens)
    return statistics.median(wall)


def component_times(model: mv.MoshiVis, image: mv.ImageKV | None, steps: int) -> dict[str, float]:
    """Median ms of each part of a step, each compiled and run on its own."""
    cfg = model.cfg
    window = model.transformer.make_cache(model.dtype)
    offset = mx.array(min(steps, cfg.context - 1))
    visible = cfg.context
    x = mx.random.normal((1, 1, cfg.dim)).astype(model.dtype)
    sampler = mv.SamplerConfig()
    keys = mx.random.split(mx.random.key(0), 1 + cfg.num_generated_codebooks)

    def temporal(x, k, v, offset, image_keys=None, image_values=None):
        img = mv.ImageKV(image_keys, image_values) if image_keys is not None else None
        return model.transformer(x, k, v, offset, visible, img)

    def depformer(out, token):
        return model.depformer(out, token, lambda logits, k: sampler.audio(logits, keys[1 + k]))

    def text_head(x):
        logits = model.text_linear(model.out_norm(x[:, 0]))
        return sampler.text(logits, keys[0])

    def run(fn, *args) -> float:
        fn = mx.compile(fn)
        times = []
        for i in range(steps + 2):
            start = time.perf_counter()
            out = fn(*args)
            if isinstance(out, tuple) and len(out) == 3:  # temporal: keep the window donated
                window.keys, window.values = out[1], out[2]
                args = (args[0], window.keys, window.values) + args[3:]
            mx.eval(out)
            if i >= 2:
                times.append(time.perf_counter() - start)
        return round(1000 * statistics.median(times), 2)

    result = {"temporal_ms": run(temporal, x, window.keys, window.values, offset)}
    if image is not None:
        with_xa = run(temporal, x, window.keys, window.values, offset, image.keys, image.values)
        result["cross_attention_ms"] = round(with_xa - result["temporal_ms"], 2)
    token = mx.array([3], dtype=mx.int32)
    result["depformer_ms"] = run(depformer, x[:, 0], token)
    result["text_head_and_sampling_ms"] = run(text_head, x)
    return result


def depformer_only(dtype: str, steps: int) -> dict:
    from moshivis_mlx.cpu.layers import keep_transposed_weights
    from moshivis_mlx.cpu.model import to_cpu_counterparts
    from moshivis_mlx.model.depformer import Depformer

    cfg = mv.moshika_vis()
    depformer = Depformer(cfg)
    random_weights(depformer, mx.bfloat16)  # as stored; then computed in `dtype`
    depformer.set_dtype(getattr(mx, dtype))
    mx.eval(depformer.parameters())
    if PATH.kind == CPU:  # as `load` does
        depformer = to_cpu_counterparts(depformer)
        keep_transposed_weights(depformer)
    sampler = mv.SamplerConfig()
    keys = mx.random.split(mx.random.key(0), 1 + cfg.num_generated_codebooks)
    frame = mx.compile(lambda x, token: depformer(x, token, lambda logits, k: sampler.audio(logits, keys[1 + k])))
    temporal_out = mx.random.normal((1, cfg.dim)).astype(mx.bfloat16)
    token = mx.array([3], dtype=mx.int32)
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        mx.eval(frame(temporal_out, token))
        if i >= 2:
            times.append(time.perf_counter() - start)
    return {"mode": "depformer", "depformer_dtype": dtype, "median_ms": round(1000 * statistics.median(times), 2)}


def quantize_as_loaded(model: mv.MoshiVis, bits: int, **tiers) -> None:
    """What `load(bits=...)` gives: the default mixed policy at `bits` (`tiers`
    override its tiers and caches), then every float (scales, norms, kept-float
    layers) in the compute dtype `dtype="auto"` picks for a quantized model
    (float32 on a CPU)."""
    from mlx.utils import tree_unflatten

    from moshivis_mlx.weights.loading import resolve_dtype
    from moshivis_mlx.weights.quantize import QuantizationPolicy, quantizable_modules, quantization_config

    policy = QuantizationPolicy.mixed(bits, **tiers)
    model.quantize_caches(policy.kv_bits, policy.image_kv_bits)
    config = quantization_config(model, policy)
    for path in list(quantizable_modules(model)):
        module = dict(model.named_modules())[path]  # no list of modules holding every float weight
        random_weights(module, mx.bfloat16)  # made here, one module at a time: the float model never exists whole
        if config.get(path):
            quantized = module.to_quantized(**config[path])
            mx.eval(quantized.parameters())
            model.update_modules(tree_unflatten([(path, quantized)]))
        del module
    model.set_dtype(getattr(mx, resolve_dtype("auto", quantized=True)))
    mx.eval(model.parameters())


def _bits_or_none(value: str) -> "int | None | str":
    return None if value == "none" else value if value == "default" else int(value)


def attention_times(dtype: str, steps: int) -> dict:
    """ms per step of 32 layers' window and image attention, float vs quantized K/V."""
    from moshivis_mlx.cpu.layers import attend
    from moshivis_mlx.model.layers import CacheQuantization, attention

    if PATH.kind == CPU:  # as the CPU counterparts attend: heads split over the CPU streams
        attention = attend
    cfg = mv.moshika_vis()
    compute = getattr(mx, dtype)
    shapes = {"window": cfg.context, "image": cfg.vision.num_tokens}
    q = (mx.random.normal((1, cfg.num_heads, 1, cfg.head_dim)) * 0.1).astype(compute)
    results: dict = {"mode": "attention", "dtype": dtype, "layers": cfg.num_layers}
    for part, length in shapes.items():
        k, v = (mx.random.normal((1, cfg.num_heads, length, cfg.head_dim)).astype(compute) for _ in range(2))
        for bits in (None, 8, 4):
            quant = CacheQuantization(bits) if bits else None
            keys, values = (quant.pack(k), quant.pack(v)) if quant else (k, v)
            mx.eval(keys, values)
            layer = mx.compile(lambda q, keys, values: attention(q, keys, values, 0.088, None, quant))
            times = []
            for i in range(steps + 2):
                start = time.perf_counter()
                mx.eval([layer(q, keys, values) for _ in range(cfg.num_layers)])
                if i >= 2:
                    times.append(time.perf_counter() - start)
            results[f"{part}_{bits or 'float'}_ms"] = round(1000 * statistics.median(times), 2)
    return results


# The products a weight lever changes, per step, at released sizes: (out, in) -> (matrices, reads of each).
# The shared cross-attention's two matrices are read by all 32 layers; every other matrix once.
LEVER_PRODUCTS = {
    "cross-attention q/out": {(4096, 4096): (2, 32)},
    "depformer": {(1024, 4096): (8, 1), (3 * 1024, 1024): (48, 1), (1024, 1024): (48, 1),
                  (2 * 2816, 1024): (48, 1), (1024, 2816): (48, 1), (2048, 1024): (8, 1)},
    "temporal layers": {(3 * 4096, 4096): (32, 1), (4096, 4096): (32, 1), (2 * 11264, 4096): (32, 1),
                        (4096, 11264): (32, 1), (512, 4096): (32, 1), (4096, 512): (32, 1)},
}
LEVER_SETTINGS = {  # lever -> (before, after) as (bits, group size)
    "cross-attention q/out": ((8, 64), (4, 64)),
    "depformer": ((8, 64), (4, 64)),
    "temporal layers": ((4, 64), (4, 128)),
}


def product_times(steps: int) -> dict:
    """ms per step of the products each weight lever changes, before and after, as the CPU path runs them."""
    import mlx.nn as nn

    from moshivis_mlx.cpu.layers import keep_transposed_weights
    from moshivis_mlx.cpu.model import to_cpu_counterparts

    results: dict = {"mode": "products"}
    for lever, shapes in LEVER_PRODUCTS.items():
        for label, (bits, group) in zip(("before", "after"), LEVER_SETTINGS[lever]):
            layers = []
            for (out_dims, in_dims), (matrices, reads) in shapes.items():
                for _ in range(matrices):
                    layer = nn.Linear(in_dims, out_dims, bias=False).to_quantized(group_size=group, bits=bits)
                    layer.set_dtype(mx.float32)  # scales in float32, as load(dtype="auto") gives on a CPU
                    mx.eval(layer.parameters())
                    layers += [layer] * reads
            if PATH.kind == CPU:
                wrapper = to_cpu_counterparts(nn.Sequential(*layers))
                keep_transposed_weights(wrapper)
                layers = wrapper.layers
            inputs = {d: mx.random.normal((1, d)) for d in {layer.weight.shape[1] * 32 // bits for layer in layers}}
            run = mx.compile(lambda: [layer(inputs[layer.weight.shape[1] * 32 // bits]) for layer in layers])
            times = []
            for i in range(steps + 2):
                start = time.perf_counter()
                mx.eval(run())
                if i >= 2:
                    times.append(time.perf_counter() - start)
            results[f"{lever} {label} ({bits}-bit/g{group}) ms"] = round(1000 * statistics.median(times), 2)
    return results


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["dispatch", "full", "depformer", "attention", "products"])
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    ap.add_argument("--no-image", action="store_true")
    ap.add_argument(
        "--depformer-dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32"],
        help="full: the dtype of the depformer, cross-attention and gates (MoshiVis.float32_on_cpu_parts); "
        "auto: what load(dtype='auto') picks (float32 for a bf16 model on a CPU)",
    )
    ap.add_argument("--bits", type=int, choices=[4, 8], help="full: quantize as load(bits=...) does (mixed policy)")
    for tier in ("cross-attention", "kv", "image-kv"):
        ap.add_argument(f"--{tier}-bits", type=_bits_or_none, default="default", metavar="N|none",
                        help=f"with --bits: the mixed policy's {tier} bits (default: the policy's)")
    ap.add_argument("--jump-to-step", type=int, default=0,
                    help="start the stream at this step without running the ones before: 3000 times a full "
                    "window in seconds (what the window holds does not change the time)")
    ap.add_argument(
        "--start-step",
        type=int,
        default=0,
        help="run this many steps untimed first: 3000 measures a full window, as after 4 minutes of conversation",
    )
    ap.add_argument("--eager", action="store_true", help="run the step uncompiled")
    ap.add_argument("--components", action="store_true", help="also time each part of the step")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args()

    if args.mode == "depformer":
        dtype = args.depformer_dtype
        dtype = (float32_parts_dtype("auto", quantized=False) or "bfloat16") if dtype == "auto" else dtype
        result = depformer_only(dtype, args.steps or 10)
        result["blas"] = BLAS.library or "bundled reference BLAS"
        result["malloc"] = malloc_status()
        result["cpu_streams"] = len(cpu_streams())
        result["platform_path"] = PATH.kind + (" (forced)" if PATH.forced else "")
        print(json.dumps(result) if args.json else "\n".join(f"{k:>14}: {v}" for k, v in result.items()))
        return
    if args.mode in ("attention", "products"):
        if args.mode == "attention":
            result = attention_times(args.dtype or "float32", args.steps or 10)
        else:
            result = product_times(args.steps or 10)
        result["blas"] = BLAS.library or "bundled reference BLAS"
        print(json.dumps(result) if args.json else "\n".join(f"{k:>14}: {v}" for k, v in result.items()))
        return
    if args.mode == "dispatch":
        cfg, dtype, steps, warmup = dispatch_config(), args.dtype or "float32", args.steps or 200, args.warmup or 20
    else:
        cfg, dtype, steps, warmup = mv.moshika_vis(), args.dtype or "bfloat16", args.steps or 20, args.warmup or 2
        cfg.xa_start = 0  # every timed step is a step with the image (the released model waits 16 steps)
    mx.random.seed(0)
    model = mv.MoshiVis(cfg)
    if not args.bits:
        random_weights(model, getattr(mx, dtype))
    tiers = {
        name: value
        for name, value in (("cross_attention_bits", args.cross_attention_bits), ("kv_bits", args.kv_bits),
                            ("image_kv_bits", args.image_kv_bits))
        if value != "default"
    }
    if args.bits:
        quantize_as_loaded(model, args.bits, **tiers)
    parts = float32_parts_dtype("auto", quantized=False) if args.depformer_dtype == "auto" else args.depformer_dtype
    if parts is not None and args.mode == "full" and not args.bits:  # as load(dtype="auto") does
        for part in model.float32_on_cpu_parts():
            part.set_dtype(getattr(mx, parts))
            mx.eval(part.parameters())
    apply_platform_path(model, PATH)  # as `load` does
    image = None if args.no_image else mx.random.normal((cfg.vision.num_tokens, cfg.vision.width))
    stream = mv.Stream(model, image, sampler=mv.SamplerConfig(seed=0), compiled=not args.eager)
    user = np.zeros(cfg.num_user_codebooks, np.int32)
    for _ in range(args.start_step):
        np.array(stream.step(user).text_logits)
    stream.offset += args.jump_to_step
    first_visible = visible_slots(stream.offset, cfg.context)

    ops = count_ops(stream, user)
    times, cpu_times = time_steps(stream, user, steps, warmup)
    # At 80 ms a step, queueing the next one hides the graph building; at seconds a step it cannot matter.
    pipelined = time_pipelined(stream, user, steps) if args.mode == "dispatch" else None
    image_kv = stream.image
    no_image = None
    if args.mode == "full" and image is not None:
        stream.set_image(None)  # the same conversation goes on without the image
        no_image = statistics.median(time_steps(stream, user, steps, warmup=1)[0])
    result = {
        "mode": args.mode,
        "dtype": dtype,
        "bits": args.bits,
        "policy_tiers": tiers,
        "caches": model.cache_quantization,
        "depformer_dtype": str(model.depformer.input_proj.weight.dtype),
        "cross_attention_dtype": str(model.transformer.cross_attention.out_proj.weight.dtype),
        "image": image is not None,
        "compiled": not args.eager,
        "median_ms": round(1000 * statistics.median(times), 2),
        "p90_ms": round(1000 * float(np.percentile(times, 90)), 2),
        "median_cpu_ms": round(1000 * statistics.median(cpu_times), 2),
        "pipelined_median_ms": round(1000 * pipelined, 2) if pipelined is not None else None,
        "median_ms_without_image": round(1000 * no_image, 2) if no_image is not None else None,
        "steps": steps,
        "start_step": args.start_step,
        "jump_to_step": args.jump_to_step,
        "window_slots_read": f"{first_visible}-{visible_slots(stream.offset, cfg.context)}",
        "ops_per_step": ops,
        "peak_rss_mb": round(peak_rss_mb()),
        "machine": f"{platform.machine()} {platform.system()} mlx {mx.__version__} {mx.default_device()}",
        "blas": BLAS.library or "bundled reference BLAS",
        "malloc": malloc_status(),
        "cpu_streams": len(cpu_streams()),
        "platform_path": PATH.kind + (" (forced)" if PATH.forced else ""),
    }
    if args.components:
        del stream  # its 1.6 GB window: the parts get a window of their own
        result.update(component_times(model, image_kv, steps))
        result["peak_rss_mb"] = round(peak_rss_mb())
    print(json.dumps(result) if args.json else "\n".join(f"{k:>14}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
