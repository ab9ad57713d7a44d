"""Mimi through rustymimi: time per frame, and what a renewal changes.

    python benchmarks/bench_mimi.py speed [--frames 100]
    python benchmarks/bench_mimi.py renewal [--extra 40]
    python benchmarks/bench_mimi.py frame-times [--frames 170]   # load_mimi with 60-frame lives, a reset at 20

`speed` times encode_step and decode_step of one 80 ms frame (real time is
80 ms for both). `renewal` checks the claim behind `moshivis_mlx.audio.mimi.RenewingCodec`:
an instance fed the last RENEWAL_OVERLAP_FRAMES frames is in the same state as
one that saw the whole stream. It runs one long-lived instance and one that is
renewed mid-stream on the same speech-like input and codes, and compares their
outputs after the switch. `frame-times` times each frame (decode, then encode)
of `load_mimi` with 60-frame instance lives across a reset and several renewals:
the slowest frame against the median, and the frames that waited for a load. Uses a random full-size Mimi (weights made from the
manifest of the real checkpoint), so it needs no download.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from machine import describe_machine  # noqa: E402
from moshivis_mlx.audio.mimi import (  # noqa: E402
    DECODE, ENCODE, MIMI_FRAME_SIZE, RENEWAL_OVERLAP_FRAMES, InProcess, RenewingCoder, RustyMimi, load_mimi,
)
from talk_support import random_mimi, speech_like  # noqa: E402


def frames(count: int) -> list[np.ndarray]:
    audio = speech_like(count * MIMI_FRAME_SIZE / 24000 + 1)
    return [audio[i * MIMI_FRAME_SIZE : (i + 1) * MIMI_FRAME_SIZE] for i in range(count)]


def speed(path: Path, count: int) -> dict:
    mimi = RustyMimi(path)
    inputs = frames(count)
    codes = [mimi.encode(f) for f in inputs[:5]]
    start = time.perf_counter()
    codes = [mimi.encode(f) for f in inputs]
    encode = (time.perf_counter() - start) / count
    start = time.perf_counter()
    for c in codes:
        mimi.decode(c)
    decode = (time.perf_counter() - start) / count
    return {"encode_ms": 1000 * encode, "decode_ms": 1000 * decode, "frames": count}


def renewal(path: Path, extra: int) -> dict:
    """Renew after `lifetime` frames; compare `extra` frames after the switch with a never-renewed instance."""
    overlap = RENEWAL_OVERLAP_FRAMES
    lifetime = 2 * overlap + 20  # the successor starts at frame lifetime - overlap, takes over at `lifetime`
    total = lifetime + extra
    inputs = frames(total)
    rng = np.random.default_rng(0)
    model_codes = rng.integers(0, 2048, (total, 8))
    reference = RustyMimi(path)  # default 32768 positions: never renewed here
    # Each direction renewed at the end of its first life (the codec staggers the decoder; not here).
    make_instance = lambda: InProcess(RustyMimi(path, max_seq_len=2 * lifetime))  # noqa: E731
    encoder, decoder = RenewingCoder(make_instance, ENCODE, overlap), RenewingCoder(make_instance, DECODE, overlap)
    ref_codes, new_codes, ref_pcm, new_pcm = [], [], [], []
    start = time.perf_counter()
    for frame, codes in zip(inputs, model_codes):
        ref_codes.append(reference.encode(frame))
        new_codes.append(encoder(frame))
        ref_pcm.append(reference.decode(codes))
        new_pcm.append(decoder(codes))
    elapsed = time.perf_counter() - start
    switch = lifetime  # from here on the successor alone answers
    after = slice(switch, total)
    codes_equal = float(np.mean(np.stack(ref_codes[after]) == np.stack(new_codes[after])))
    first_codebook_equal = float(np.mean(np.stack(ref_codes[after])[:, 0] == np.stack(new_codes[after])[:, 0]))
    pcm_ref, pcm_new = np.concatenate(ref_pcm[after]), np.concatenate(new_pcm[after])
    before = slice(0, switch)
    return {
        "renewals": min(encoder.renewals, decoder.renewals),
        "frames_compared_after_switch": total - switch,
        "codes_identical_after_switch": codes_equal,
        "first_codebook_identical_after_switch": first_codebook_equal,
        "codes_identical_before_switch": float(np.mean(np.stack(ref_codes[before]) == np.stack(new_codes[before]))),
        "decoded_max_abs_diff_after_switch": float(np.max(np.abs(pcm_ref - pcm_new))),
        "decoded_rms_after_switch": float(np.sqrt(np.mean(pcm_ref**2))),
        "seconds": elapsed,
    }


def frame_times(path: Path, count: int) -> dict:
    codec = load_mimi(path, max_seq_len=120, overlap_frames=6)
    inputs, codes = frames(count), np.random.default_rng(0).integers(0, 2048, (count, 8))
    times = []
    try:
        for i, (frame, model_codes) in enumerate(zip(inputs, codes)):
            if i == 20:
                codec.reset()
            start = time.perf_counter()
            codec.decode(model_codes)
            codec.encode(frame)
            times.append(time.perf_counter() - start)
    finally:
        codec.close()
    ms = 1000 * np.array(times[3:])  # the first frames warm up
    return {
        "frames": count,
        "renewals": {"encoder": codec.encoder.renewals, "decoder": codec.decoder.renewals},
        "waits_for_a_load": codec.encoder.waits + codec.decoder.waits,
        "median_ms": round(float(np.median(ms)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "max_ms": round(float(ms.max()), 1),
        "max_over_median": round(float(ms.max() / np.median(ms)), 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("speed", "renewal", "frame-times"))
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--extra", type=int, default=40)
    args = p.parse_args()
    path = random_mimi()
    if args.what == "speed":
        result = speed(path, args.frames)
    elif args.what == "renewal":
        result = renewal(path, args.extra)
    else:
        result = frame_times(path, args.frames)
    result["machine"] = describe_machine()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
