"""A conversation's frame period and latency, one frame at a time against pipelined; and a soak.

    python benchmarks/bench_conversation.py [--model fixture|dispatch] [--codec mimi|fake] [--frames 200]
    python benchmarks/bench_conversation.py --soak --frames 1500 --mimi-max-seq-len 400   # renewals, memory

The model has random weights: `fixture` is the tests' tiny model (fixture
A's sizes, Mimi's 2048 audio codes), `dispatch` the released depth (32
temporal layers, 6 depformer layers, 8 codebooks) at tiny widths, so a step
costs what MLX's scheduling costs. `--codec mimi` is the real codec
(rustymimi) with random full-size weights; `fake` the tests' instantaneous
stand-in, which leaves the model's and the conversation's own cost.

Three runs of the same frames, each reported with its median and p99:
  * serial: `Conversation.step`, one frame in flight; period = latency;
  * pipelined: frames pushed as fast as the conversation takes them (3 in
    flight); the period is the time between two answers, set by the slowest
    stage (on 2 cores here, by the cores too: the stages share them);
  * real time: one frame pushed every 80 ms, as a microphone delivers them;
    the latency is from a frame's push to its answer.
`--soak` runs only the pipelined loop, for long, and samples the resident
memory; a small `--mimi-max-seq-len` makes Mimi renew its instances often.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from moshivis_mlx.cpu.blas import use_optimized_blas  # noqa: E402
from moshivis_mlx.cpu.malloc import restart_with_jemalloc  # noqa: E402

restart_with_jemalloc()  # MOSHIVIS_MLX_MALLOC=system measures with glibc's malloc

BLAS = use_optimized_blas()

import dataclasses  # noqa: E402

import numpy as np  # noqa: E402

import moshivis_mlx as mv  # noqa: E402
from moshivis_mlx.cpu.platform_path import apply_platform_path, choose_platform_path  # noqa: E402
from moshivis_mlx.audio.mimi import MIMI_CODEBOOK_SIZE, MAX_SEQ_LEN, InProcess, RenewingCodec, load_mimi  # noqa: E402
from machine import describe_machine  # noqa: E402
from talk_support import FakeCodec, build_model, random_mimi, rss_bytes, speech_like, train_tokenizer  # noqa: E402

FRAME_SECONDS = 0.08
WARMUP_FRAMES = 5


class SilentTokenizer:
    """A tokenizer of any size whose pieces are all control tokens: for a model whose text
    vocabulary (the released 32,000) no small test tokenizer covers; text costs nothing."""

    def __init__(self, size: int):
        self.size = size

    def GetPieceSize(self) -> int:  # noqa: N802 (sentencepiece's names)
        return self.size

    def IsControl(self, token: int) -> bool:  # noqa: N802
        return True


def make_model(kind: str):
    """Random weights, then the platform's path applied as `load` applies it."""
    if kind == "fixture":
        model = build_model()
    else:
        from bench_step import dispatch_config

        model = build_model(dataclasses.replace(dispatch_config(), audio_card=MIMI_CODEBOOK_SIZE))
    return apply_platform_path(model, choose_platform_path())


def make_codec(kind: str, max_seq_len: int):
    if kind == "fake":
        return RenewingCodec(lambda: InProcess(FakeCodec(max_frames=max_seq_len // 2)))
    return load_mimi(random_mimi(), max_seq_len=max_seq_len)


def children_rss_bytes() -> int:
    """Resident memory of this process's children (Mimi's codec processes), Linux."""
    total = 0
    for children in Path("/proc/self/task").glob("*/children"):
        for pid in children.read_text().split():
            try:
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * 4096
            except (OSError, IndexError):
                pass  # ended meanwhile
    return total


def summary(values_s: list[float]) -> dict:
    ms = 1000 * np.asarray(values_s)
    return {"median_ms": round(float(np.median(ms)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "max_ms": round(float(ms.max()), 2)}


def run_serial(conv, frames: list[np.ndarray]) -> dict:
    times = []
    for frame in frames:
        start = time.perf_counter()
        conv.step(frame)
        times.append(time.perf_counter() - start)
    return {"period": summary(times[WARMUP_FRAMES:]), "latency": summary(times[WARMUP_FRAMES:])}


def run_pipelined(conv, frames: list[np.ndarray], in_flight: int = 3, rss_every: int = 0) -> dict:
    done, stage_seconds, rss = [], [], {}  # not the answers themselves: a soak must hold nothing per frame

    def take() -> None:
        out = conv.receive()
        done.append(out.done_at)
        stage_seconds.append(out.stage_seconds)
        if rss_every and len(done) % rss_every == 0:
            rss[len(done)] = [round(rss_bytes() / 2**20, 1), round(children_rss_bytes() / 2**20, 1)]

    for frame in frames:
        while conv.in_flight >= in_flight:
            take()
        conv.push(frame)
    while len(done) < len(frames):
        take()
    stages = {name: summary([s[name] for s in stage_seconds[WARMUP_FRAMES:]]) for name in stage_seconds[-1]}
    result = {"period": summary(np.diff(np.array(done))[WARMUP_FRAMES:].tolist()), "stages": stages}
    if rss:
        result["rss_mib_at_frame"] = rss  # [this process, Mimi's processes]
    return result


def run_real_time(conv, frames: list[np.ndarray]) -> dict:
    """One frame every 80 ms; answers taken on another thread, as live mode does."""
    import threading

    outputs = []

    def take() -> None:
        for _ in frames:
            outputs.append(conv.receive())

    receiver = threading.Thread(target=take)
    receiver.start()
    start = time.perf_counter()
    for i, frame in enumerate(frames):
        delay = start + i * FRAME_SECONDS - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        conv.push(frame)
    receiver.join()
    steady = outputs[WARMUP_FRAMES:]
    late = sum(o.done_at > start + (o.index - outputs[0].index + 1) * FRAME_SECONDS + 0.5 for o in steady)
    return {"latency": summary([o.latency for o in steady]), "answers_over_0.5s_late": int(late)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("fixture", "dispatch"), default="fixture")
    p.add_argument("--codec", choices=("mimi", "fake"), default="mimi")
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--mimi-max-seq-len", type=int, default=MAX_SEQ_LEN)
    p.add_argument("--soak", action="store_true", help="the pipelined loop only, with memory samples")
    p.add_argument("--rss-every", type=int, default=100)
    args = p.parse_args()
    codec = make_codec(args.codec, args.mimi_max_seq_len)
    model = make_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_tokenizer(Path(tmp) / "spm.model") if args.model == "fixture" else \
            SilentTokenizer(model.cfg.text_card)
        conv = mv.Conversation(model, codec, tokenizer, sampler=mv.SamplerConfig(seed=0))
    audio = speech_like(10.0)
    size = conv.frame_size
    frames = [audio[(i * size) % (len(audio) - size):][:size] for i in range(args.frames)]
    result = {"model": args.model, "codec": args.codec, "frames": args.frames}
    start = time.perf_counter()
    try:
        if args.soak:
            result["pipelined"] = run_pipelined(conv, frames, rss_every=args.rss_every)
        else:
            result["serial"] = run_serial(conv, frames)
            result["pipelined"] = run_pipelined(conv, frames)
            result["real_time"] = run_real_time(conv, frames)
            result["period_ratio_pipelined_to_serial"] = round(
                result["pipelined"]["period"]["median_ms"] / result["serial"]["period"]["median_ms"], 2)
        result["wall_seconds"] = round(time.perf_counter() - start, 1)
        result["mimi_renewals"] = {"encoder": codec.encoder.renewals, "decoder": codec.decoder.renewals}
        result["mimi_waits_for_a_load"] = codec.encoder.waits + codec.decoder.waits
        result["mimi_life_frames"] = codec.max_frames
    finally:
        conv.close()
    result["blas"] = str(BLAS)
    result["machine"] = describe_machine()
    result["date"] = datetime.date.today().isoformat()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
