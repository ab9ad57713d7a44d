"""Upstream's step and ours, on the same machine, in the same run.

    pip install --no-deps moshi_mlx==0.3.0      # upstream Moshi MLX, for this benchmark only
    python benchmarks/bench_upstream.py full    # released widths, 8 of 32 layers, bf16, random weights
    python benchmarks/bench_upstream.py dispatch [--start-step 3000]  # 3000: both at a full window

CPU speed on a shared machine drifts by tens of percent from one hour to the
next, so a figure measured some other day is no yardstick. This runs
Kyutai's own MLX Moshi (`moshi_mlx`: the temporal transformer and depformer
that upstream MoshiVis builds on, without the cross-attention) and our stream
without an image, alternating step by step on the same shapes and samplers:
the ratio is what it is today. Upstream's MoshiVis MLX code is not on PyPI;
its temporal transformer and depformer are these ones plus the
cross-attention.

Two full-size models do not fit next to each other in 24 GB, so `full` keeps 8
of the 32 temporal layers (`--layers`); the depformer, vocabularies and
samplers are full size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moshivis_mlx.cpu.blas import use_optimized_blas  # noqa: E402
from moshivis_mlx.cpu.malloc import restart_with_jemalloc, status as malloc_status  # noqa: E402

restart_with_jemalloc()  # MOSHIVIS_MLX_MALLOC=system measures with glibc's malloc

BLAS = use_optimized_blas()

import mlx.core as mx  # noqa: E402

import moshivis_mlx as mv  # noqa: E402
from moshivis_mlx.cpu.cores import cpu_streams  # noqa: E402
from bench_step import dispatch_config, random_weights  # noqa: E402
from moshivis_mlx.cpu.platform_path import apply_platform_path, choose_platform_path  # noqa: E402


def upstream_model(cfg: mv.ModelConfig, dtype: mx.Dtype):
    try:
        from moshi_mlx.models import lm
        from moshi_mlx.modules.transformer import TransformerConfig
    except ImportError:
        sys.exit("needs upstream Moshi MLX: pip install --no-deps moshi_mlx==0.3.0")

    def transformer(dim, heads, layers, ffn_hidden, context, rope):
        # upstream derives the gated FFN width from dim_feedforward (11 * dim / 4 when it is 4 * dim)
        assert ffn_hidden == 11 * dim // 4, "upstream only builds the 11/4 gated FFN width"
        return TransformerConfig(
            d_model=dim, num_heads=heads, num_layers=layers, dim_feedforward=4 * dim, causal=True,
            norm_first=True, bias_ff=False, bias_attn=False, layer_scale=None, context=context,
            max_period=int(cfg.rope_max_period), use_conv_block=False, use_conv_bias=True,
            cross_attention=False, gating=True, norm="rms_norm",
            positional_embedding="rope" if rope else "none", conv_layout=False, conv_kernel_size=3,
            kv_repeat=1, max_seq_len=4096,
        )  # fmt: skip

    dep = cfg.depformer
    lm_cfg = lm.LmConfig(
        transformer=transformer(cfg.dim, cfg.num_heads, cfg.num_layers, cfg.ffn_hidden, cfg.context, True),
        depformer=lm.DepFormerConfig(
            transformer=transformer(dep.dim, dep.num_heads, dep.num_layers, dep.ffn_hidden, dep.num_steps, False),
            num_slices=dep.num_steps,
        ),
        audio_vocab_size=cfg.audio_card + 1,
        text_in_vocab_size=cfg.text_card + 1,
        text_out_vocab_size=cfg.text_card,
        audio_codebooks=cfg.num_audio_codebooks,
        audio_delays=list(cfg.delays[1:]),
        conditioners={},
    )
    model = lm.Lm(lm_cfg)
    random_weights(model, dtype)
    return model


def dispatch_shapes() -> mv.ModelConfig:
    """The dispatch-bound shapes with upstream's FFN width rule (11/4 of dim)."""
    cfg = dispatch_config()
    cfg.ffn_hidden = 11 * cfg.dim // 4
    cfg.depformer.ffn_hidden = 11 * cfg.depformer.dim // 4
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["full", "dispatch"])
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None, help="temporal layers (full: 8)")
    ap.add_argument("--start-step", type=int, default=0, help="untimed steps of both first (3000: a full window)")
    args = ap.parse_args()
    if args.mode == "full":
        cfg, dtype, steps = mv.moshika_vis(), mx.bfloat16, args.steps or 10
        cfg.num_layers = args.layers or 8
    else:
        cfg, dtype, steps = dispatch_shapes(), mx.float32, args.steps or 200
        cfg.num_layers = args.layers or cfg.num_layers

    from moshi_mlx.utils import sampling

    mx.random.seed(0)
    ours = mv.MoshiVis(cfg)
    random_weights(ours, dtype)
    apply_platform_path(ours, choose_platform_path())  # as `load` does
    stream = mv.Stream(ours, None, sampler=mv.SamplerConfig(seed=0))
    upstream = upstream_model(cfg, dtype)
    text_sampler = sampling.Sampler(temp=0.45, top_k=25)
    audio_sampler = sampling.Sampler(temp=0.7, top_k=250)
    user = np.zeros(cfg.num_user_codebooks, np.int32)
    text_in = mx.array([[cfg.text_card]])
    audio_in = [mx.array([[0]])] * upstream.cfg.other_codebooks

    def upstream_step() -> None:
        mx.eval(upstream.sample(text_in, audio_in, text_sampler, audio_sampler))

    def our_step() -> None:
        out = stream.step(user)
        mx.eval(out.text_logits, out.audio_logits)

    for _ in range(3 + args.start_step):
        upstream_step()
        our_step()
    times: dict[str, list[float]] = {"upstream": [], "ours": []}
    for _ in range(steps):
        for name, fn in (("upstream", upstream_step), ("ours", our_step)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    result = {
        "mode": args.mode,
        "dtype": str(dtype),
        "temporal_layers": cfg.num_layers,
        "steps": steps,
        "start_step": args.start_step,
        "upstream_median_ms": round(1000 * statistics.median(times["upstream"]), 2),
        "ours_median_ms": round(1000 * statistics.median(times["ours"]), 2),
        "blas": BLAS.library or "bundled reference BLAS",
        "malloc": malloc_status(),
        "cpu_streams": len(cpu_streams()),
        "mlx": mx.__version__,
    }
    result["ratio"] = round(result["ours_median_ms"] / result["upstream_median_ms"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
