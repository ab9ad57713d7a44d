"""A long conversation: time per frame and resident memory over time.

    python benchmarks/bench_conversation.py [--frames 7500] [--codec fake|mimi]

The tiny model of the tests (fixture A's sizes, Mimi's 2048 audio codes,
random weights) talks through `Conversation` for `--frames` frames (7,500 =
10 minutes). `--codec fake` replaces Mimi by the instantaneous stand-in of the
tests (it fails where rustymimi's default does, behind the same renewal), so
the numbers are the model's and the conversation's; `--codec mimi` uses the
real codec with random full-size weights.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from moshivis_mlx.blas import use_optimized_blas  # noqa: E402
from moshivis_mlx.malloc import restart_with_jemalloc  # noqa: E402

restart_with_jemalloc()  # MOSHIVIS_MLX_MALLOC=system measures with glibc's malloc

BLAS = use_optimized_blas()

import numpy as np  # noqa: E402

import moshivis_mlx as mv  # noqa: E402
from moshivis_mlx.mimi import RenewingCodec, load_mimi  # noqa: E402
from talk_support import FakeCodec, build_model, random_mimi, rss_bytes, speech_like, train_tokenizer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=7500)
    p.add_argument("--codec", choices=("fake", "mimi"), default="fake")
    args = p.parse_args()
    codec = RenewingCodec(lambda: FakeCodec(max_frames=4096)) if args.codec == "fake" else load_mimi(random_mimi())
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_tokenizer(Path(tmp) / "spm.model")
        conv = mv.Conversation(build_model(), codec, tokenizer, sampler=mv.SamplerConfig(seed=0))
    audio = speech_like(10.0)
    frame = conv.frame_size
    marks = sorted({m for m in (1, 100, 1000, 2000, 4000, 6000, args.frames) if m <= args.frames})
    rss, times = {}, []
    start = time.perf_counter()
    for i in range(args.frames):
        offset = (i * frame) % (len(audio) - frame)
        t = time.perf_counter()
        conv.step(audio[offset : offset + frame])
        times.append(time.perf_counter() - t)
        if i + 1 in marks:
            rss[i + 1] = round(rss_bytes() / 2**20, 1)
    total = time.perf_counter() - start
    steady = np.array(times[10:])
    print(json.dumps({
        "codec": args.codec,
        "frames": args.frames,
        "wall_seconds": round(total, 1),
        "ms_per_frame_median": round(1000 * float(np.median(steady)), 2),
        "ms_per_frame_p99": round(1000 * float(np.percentile(steady, 99)), 2),
        "ms_first_frame": round(1000 * times[0], 1),
        "rss_mib_at_frame": rss,
        "codec_renewals": getattr(codec, "renewals", None),
        "blas": str(BLAS),
        "machine": f"{platform.system()} {platform.machine()}, {platform.processor() or 'cpu'}",
    }, indent=1))


if __name__ == "__main__":
    main()
