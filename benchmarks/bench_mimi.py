"""Mimi through rustymimi: time per frame, and what a renewal changes.

    python benchmarks/bench_mimi.py speed [--frames 100]
    python benchmarks/bench_mimi.py renewal [--extra 40]

`speed` times encode_step and decode_step of one 80 ms frame (real time is
80 ms for both). `renewal` checks the claim behind `moshivis_mlx.mimi.RenewingCodec`:
an instance fed the last RENEWAL_OVERLAP_FRAMES frames is in the same state as
one that saw the whole stream. It runs one long-lived instance and one that is
renewed mid-stream on the same speech-like input and codes, and compares their
outputs after the switch. Uses a random full-size Mimi (weights made from the
manifest of the real checkpoint), so it needs no download.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from moshivis_mlx.mimi import DECODE, ENCODE, MIMI_FRAME_SIZE, RENEWAL_OVERLAP_FRAMES, InProcess, RenewingCoder, RustyMimi  # noqa: E402
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("speed", "renewal"))
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--extra", type=int, default=40)
    args = p.parse_args()
    path = random_mimi()
    result = speed(path, args.frames) if args.what == "speed" else renewal(path, args.extra)
    result["machine"] = f"{platform.system()} {platform.machine()}, {platform.processor() or 'cpu'}"
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
