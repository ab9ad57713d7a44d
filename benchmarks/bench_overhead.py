"""What one MLX operation costs on this machine, and where a dispatch-bound step's time goes.

    python benchmarks/bench_overhead.py

Three measurements behind the README's account of the dispatch-bound step:

* `per_op_us`: a compiled chain of N tiny operations of one kind, timed at two
  lengths; the slope is the cost of one more operation. Products and reductions
  are dispatched to MLX's CPU stream thread; views (reshapes) are not.
* `step_threads_ms`: CPU time per step of each thread of the process while the
  dispatch-bound stream runs (from /proc, Linux only): the main thread builds
  and schedules the graph, MLX's stream thread executes it.
* `one_core_ms`: the same step with the process on one core (Linux only), to
  show how much the second thread's parallelism gives back.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moshivis_mlx.cpu.blas import use_optimized_blas  # noqa: E402
from moshivis_mlx.cpu.malloc import restart_with_jemalloc, status as malloc_status  # noqa: E402

restart_with_jemalloc()
BLAS = use_optimized_blas()

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

import moshivis_mlx as mv  # noqa: E402
from bench_step import dispatch_config, random_weights  # noqa: E402
from moshivis_mlx.cpu.platform_path import apply_platform_path, choose_platform_path  # noqa: E402


def chain(kind: str, length: int):
    weight = mx.random.normal((16, 16)) * 0.1
    mx.eval(weight)

    def fn(x):
        for _ in range(length):
            if kind == "product":
                x = x @ weight
            elif kind == "reduction":
                x = mx.sum(x, axis=-1, keepdims=True) * x  # a Sum and a fused multiply
            else:
                x = x.reshape(16, 1).reshape(1, 16)  # two views
        return x

    return mx.compile(fn)


def median_seconds(fn, x, repeats: int = 50) -> float:
    for _ in range(5):
        mx.eval(fn(x))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn(x))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def per_op_us() -> dict[str, float]:
    x = mx.random.normal((1, 16))
    mx.eval(x)
    ops_per_link = {"product": 1, "reduction": 2, "view": 2}
    result = {}
    for kind, per_link in ops_per_link.items():
        short, long = (median_seconds(chain(kind, n), x) for n in (500, 1500))
        result[kind] = round(1e6 * (long - short) / (1000 * per_link), 2)
    return result


def thread_cpu_seconds() -> dict[str, float]:
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        out[tid] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def dispatch_stream(image: bool) -> tuple[mv.Stream, np.ndarray]:
    cfg = dispatch_config()
    mx.random.seed(0)
    model = mv.MoshiVis(cfg)
    random_weights(model, mx.float32)
    apply_platform_path(model, choose_platform_path())  # as `load` does
    features = mx.random.normal((cfg.vision.num_tokens, cfg.vision.width)) if image else None
    return mv.Stream(model, features, sampler=mv.SamplerConfig(seed=0)), np.zeros(cfg.num_user_codebooks, np.int32)


def step_threads_ms(image: bool, steps: int = 300) -> dict[str, float]:
    stream, user = dispatch_stream(image)
    for _ in range(30):
        np.array(stream.step(user).tokens)
    before, start = thread_cpu_seconds(), time.perf_counter()
    for _ in range(steps):
        np.array(stream.step(user).tokens)
    wall, after = time.perf_counter() - start, thread_cpu_seconds()
    main = str(os.getpid())
    busy = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    others = sorted((t for t in busy if t != main), key=busy.get, reverse=True)
    return {
        "wall": round(1000 * wall / steps, 2),
        "main_thread": round(1000 * busy[main] / steps, 2),
        "busiest_other_thread": round(1000 * busy[others[0]] / steps, 2) if others else 0.0,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--threads-only":  # the one-core child
        print(json.dumps(step_threads_ms(image=True)))
        return
    result = {"per_op_us": per_op_us()}
    if sys.platform == "linux":
        result["step_threads_ms"] = {
            "image": step_threads_ms(image=True),
            "no_image": step_threads_ms(image=False),
        }
        one_core = subprocess.run(
            ["taskset", "-c", str(min(os.sched_getaffinity(0))), sys.executable, __file__, "--threads-only"],
            capture_output=True, text=True,
        )  # fmt: skip
        if one_core.returncode == 0:
            result["one_core_ms"] = json.loads(one_core.stdout.strip().splitlines()[-1])
    result.update(
        cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        blas=BLAS.library or "bundled reference BLAS",
        malloc=malloc_status(),
        mlx=mx.__version__,
    )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
