"""Time and peak memory to embed one 448 x 448 image with the full-size SigLIP
tower (So400m: 27 layers, width 1152, 1024 tokens; random weights).

    python benchmarks/bench_image.py                      # float32, bf16, q8; one process each
    python benchmarks/bench_image.py --variants bf16-compute q8-qmm
    python benchmarks/bench_image.py --blas both          # with and without OpenBLAS
    python benchmarks/bench_image.py --projection         # only the image K/V projection, bf16 vs float32

Variants (weights in memory / compute dtype):
  float32       float32 / float32
  bf16          bfloat16 / float32 (CPU default with a fast BLAS: weights upcast one matrix at a time)
  bf16-compute  bfloat16 / bfloat16 (GPU default, and CPU default with the reference BLAS)
  q8            8-bit encoder Linears, float32 scales / float32 (on the CPU: dequantize + BLAS)
  q8-qmm        nn.QuantizedLinear (mx.quantized_matmul; fc2, 4304 inputs, stays float32)

Each variant runs in its own process so its peak RSS (`ru_maxrss`) is its own;
weights are materialised layer by layer so construction does not inflate it.
Timed: one call of the tower on preprocessed pixels (the first call, as an
app would see it, unless --repeats > 1: then the best), plus, separately,
decoding and resizing a 1920 x 1080 JPEG. On Linux, MLX's CPU wheel ships a
reference BLAS; the system OpenBLAS is used when installed
(`moshivis_mlx.cpu.blas`), and `--blas bundled` / `both` measures without it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moshivis_mlx.cpu.blas import OPT_OUT_VARIABLE, use_optimized_blas  # noqa: E402
from moshivis_mlx.cpu.malloc import restart_with_jemalloc  # noqa: E402

restart_with_jemalloc()  # MOSHIVIS_MLX_MALLOC=system measures with glibc's malloc

BLAS = use_optimized_blas()  # MOSHIVIS_MLX_BLAS=bundled measures without it

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from moshivis_mlx.model.config import VisionConfig  # noqa: E402
from moshivis_mlx.cpu.model import VISION_COUNTERPARTS, to_cpu_counterparts  # noqa: E402
from moshivis_mlx.model.image import preprocess  # noqa: E402
from moshivis_mlx.cpu.platform_path import CPU, choose_platform_path  # noqa: E402
from moshivis_mlx.model.siglip import (  # noqa: E402
    SiglipVisionTower,
    is_quantizable_vision_layer,
    quantize_vision_tower,
)

VARIANTS = {  # name: (weight dtype, compute dtype, quantization bits, plain nn.QuantizedLinear)
    "float32": (mx.float32, mx.float32, None, False),
    "bf16": (mx.bfloat16, mx.float32, None, False),
    "bf16-compute": (mx.bfloat16, mx.bfloat16, None, False),
    "q8": (mx.float32, mx.float32, 8, False),
    "q8-qmm": (mx.float32, mx.float32, 8, True),
}
QUANT_GROUP = 64
PATH = choose_platform_path()  # MOSHIVIS_MLX_FORCE_GPU_PATH=1: what a GPU runs
PHOTO_SIZE = (1080, 1920)  # a typical photo, to time decoding + resizing


def tower_flops(cfg: VisionConfig) -> float:
    n, d, h = cfg.num_tokens, cfg.width, cfg.mlp_hidden
    per_layer = 2 * n * d * (4 * d + 2 * h) + 2 * 2 * n * n * d  # projections + MLP, then QK^T and AV
    return cfg.num_layers * per_layer + 2 * n * d * cfg.patch_size**2 * 3


def build_tower(cfg: VisionConfig, weight_dtype: mx.Dtype, bits: int | None, plain: bool) -> SiglipVisionTower:
    """Random weights, evaluated layer by layer so peak memory is the final size."""
    tower = SiglipVisionTower(cfg)
    tower.set_dtype(weight_dtype)
    if bits is not None and plain:
        nn.quantize(tower, QUANT_GROUP, bits, class_predicate=lambda p, m: is_quantizable_vision_layer(p, m) and m.weight.shape[-1] % QUANT_GROUP == 0)
    elif bits is not None:
        quantize_vision_tower(tower, bits=bits, group_size=QUANT_GROUP)
    for layer in tower.encoder.layers:
        mx.eval(layer.parameters())
        mx.clear_cache()
    mx.eval(tower.parameters())
    mx.clear_cache()
    if PATH.kind == CPU and not plain:  # as `load` does: the CPU counterparts (q8: dequantize + BLAS)
        tower = to_cpu_counterparts(tower, VISION_COUNTERPARTS)
    return tower


def weight_bytes(tower: SiglipVisionTower) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(tower.parameters()))


def time_preprocessing() -> float:
    from PIL import Image

    rng = np.random.default_rng(0)
    h, w = PHOTO_SIZE
    photo = (np.linspace(0, 255, w)[None, :, None] + rng.normal(0, 20, (h, w, 3))).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    start = time.perf_counter()
    preprocess(data, VisionConfig().image_size)
    return time.perf_counter() - start


def run_variant(name: str, repeats: int) -> dict:
    weight_dtype, compute_dtype, bits, plain = VARIANTS[name]
    cfg = VisionConfig()
    tower = build_tower(cfg, weight_dtype, bits, plain)
    pixels = mx.random.uniform(-1, 1, (1, cfg.image_size, cfg.image_size, 3)).astype(compute_dtype)
    mx.eval(pixels)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mx.reset_peak_memory()
    times, cpu_times = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        mx.eval(tower(pixels))
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - start_cpu)
    best = min(range(repeats), key=times.__getitem__)
    return {
        "variant": name,
        "seconds": times[best],
        "cpu_seconds": cpu_times[best],
        "gflops_per_s": tower_flops(cfg) / times[best] / 1e9,
        "weights_mb": weight_bytes(tower) / 1e6,
        "mlx_peak_mb": mx.get_peak_memory() / 1e6,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_mb": rss_before / 1024,
        "preprocess_seconds": time_preprocessing(),
        "blas": BLAS.library or "bundled reference BLAS",
    }


def time_projection() -> dict:
    """Features (1024, 1152) -> the image's cross-attention K/V, released shapes, bf16 weights,
    computed in bf16 and in float32 (what `MoshiVis.image_kv_from_features` picks on a CPU with BLAS)."""
    from bench_step import random_weights
    from moshivis_mlx.model.config import ModelConfig
    from moshivis_mlx.model.model import ImageProjection
    from moshivis_mlx.model.temporal import SharedCrossAttention

    cfg = ModelConfig()
    prefix, xa = ImageProjection(cfg), SharedCrossAttention(cfg.dim, cfg.num_heads)
    for module in (prefix, xa):
        random_weights(module, mx.bfloat16)
    features = mx.random.normal((cfg.vision.num_tokens, cfg.vision.width))
    mx.eval(features)
    result = {}
    for dtype in (mx.bfloat16, mx.float32):
        start = time.perf_counter()
        kv = xa.image_kv(prefix(features.astype(dtype)))
        mx.eval(kv.keys.astype(mx.bfloat16), kv.values.astype(mx.bfloat16))
        result[f"{dtype}".split(".")[-1] + "_seconds"] = round(time.perf_counter() - start, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["float32", "bf16", "q8"], choices=list(VARIANTS))
    parser.add_argument("--blas", choices=("optimized", "bundled", "both"), default="optimized")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per variant (best is kept)")
    parser.add_argument("--projection", action="store_true", help="only time the image's K/V projection")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_variant(args.one, args.repeats)))
        return
    if args.projection:
        print(json.dumps({**time_projection(), "blas": BLAS.library or "bundled reference BLAS"}))
        return
    blas_runs = {"optimized": [True], "bundled": [False], "both": [False, True]}[args.blas]
    cfg = VisionConfig()
    print(
        f"SigLIP So400m, {cfg.image_size}x{cfg.image_size} -> {cfg.num_tokens} tokens, "
        f"{tower_flops(cfg) / 1e12:.2f} TFLOP; {platform.machine()} {platform.system()}, "
        f"{os.cpu_count()} cores, mlx {mx.__version__}, device {mx.default_device()}"
    )
    print("| variant | BLAS | seconds | CPU s | GFLOP/s | weights MB | MLX peak MB | peak RSS MB | preprocess s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for optimized in blas_runs:
        for name in args.variants:
            env = dict(os.environ)
            if optimized:  # MOSHIVIS_MLX_BLAS=openblas or =blis still chooses the library
                if env.get(OPT_OUT_VARIABLE, "").lower() == "bundled":
                    env.pop(OPT_OUT_VARIABLE)
            else:
                env[OPT_OUT_VARIABLE] = "bundled"
                env.pop("LD_PRELOAD", None)
            command = [sys.executable, __file__, "--one", name, "--repeats", str(args.repeats)]
            out = subprocess.run(command, env=env, capture_output=True, text=True)
            if out.returncode:
                print(f"| {name} | {'optimized' if optimized else 'bundled'} | failed: {out.stderr.strip()[-300:]} |")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"| {name} | {Path(r['blas']).name} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | "
                f"{r['gflops_per_s']:.0f} | {r['weights_mb']:.0f} | {r['mlx_peak_mb']:.0f} | "
                f"{r['peak_rss_mb']:.0f} | {r['preprocess_seconds']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
