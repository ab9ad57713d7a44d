"""Mimi through rustymimi: time per frame, and what a renewal changes.

    python benchmarks/bench_mimi.py speed [--frames 100]
    python benchmarks/bench_mimi.py renewal [--extra 40] [--feed-chunk 5]
    python benchmarks/bench_mimi.py frame-times [--frames 170] [--feed-chunk 5] [--life 80]   # a reset at 20
    python benchmarks/bench_mimi.py successor-cpu [--chunks 1,5] [--overlap 375]

`speed` times encode_step and decode_step of one 80 ms frame (real time is
80 ms for both). `renewal` checks the claim behind `moshivis_mlx.audio.mimi.RenewingCodec`:
an instance fed the last RENEWAL_OVERLAP_FRAMES frames (in chunks of
`--feed-chunk`, in a process of its own) is in the same state as one that saw
the whole stream. It runs one long-lived instance and one that is renewed
mid-stream on the same speech-like input and codes, and compares their outputs
after the switch. `frame-times` times each frame (decode, then encode) of
`load_mimi` with short instance lives (80 frames) across a reset and several renewals:
the slowest frame against the median, the frames that waited for a load, the
take-overs that waited for a successor (`stalls`). `successor-cpu` renews one
direction at a time, one frame every 80 ms as in live mode, and reads from
/proc/<pid>/stat the CPU time a successor's process spends per frame it is fed,
for each chunk size, against the current instance's per frame it answers.
Uses a random full-size Mimi (weights made from the manifest of the real
checkpoint), so it needs no download.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from machine import describe_machine  # noqa: E402
from moshivis_mlx.audio.mimi import (  # noqa: E402
    DECODE, ENCODE, FEED_CHUNK_FRAMES, MIMI_FRAME_SIZE, RENEWAL_OVERLAP_FRAMES, MimiProcess, RenewingCoder, RustyMimi,
    load_mimi,
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


def renewal(path: Path, extra: int, feed_chunk: int) -> dict:
    """Renew after a first life; compare `extra` frames after the switch with a never-renewed instance."""
    overlap = RENEWAL_OVERLAP_FRAMES
    lifetime = 2 * (overlap + 4 * feed_chunk) + 20  # renewed at lifetime - overlap - catch-up, switched by `lifetime`
    total = lifetime + extra
    inputs = frames(total)
    rng = np.random.default_rng(0)
    model_codes = rng.integers(0, 2048, (total, 8))
    reference = RustyMimi(path)  # default 32768 positions: never renewed here
    # Each direction renewed at the end of its first life (the codec staggers the decoder; not here).
    make_instance = lambda: MimiProcess(path, max_seq_len=2 * lifetime)  # noqa: E731
    encoder = RenewingCoder(make_instance, ENCODE, overlap, feed_chunk=feed_chunk)
    decoder = RenewingCoder(make_instance, DECODE, overlap, feed_chunk=feed_chunk)
    encoder.wait_ready()
    decoder.wait_ready()
    ref_codes, new_codes, ref_pcm, new_pcm = [], [], [], []
    start = time.perf_counter()
    try:
        for frame, codes in zip(inputs, model_codes):
            ref_codes.append(reference.encode(frame))
            new_codes.append(encoder(frame))
            ref_pcm.append(reference.decode(codes))
            new_pcm.append(decoder(codes))
    finally:
        encoder.close()
        decoder.close()
    elapsed = time.perf_counter() - start
    # from its switch on the successor alone answers (which frame depends on timing)
    codes_after = slice(encoder.takeovers[0][1], total)
    pcm_after = slice(decoder.takeovers[0][1], total)
    codes_equal = float(np.mean(np.stack(ref_codes[codes_after]) == np.stack(new_codes[codes_after])))
    first_codebook_equal = float(np.mean(np.stack(ref_codes[codes_after])[:, 0] == np.stack(new_codes[codes_after])[:, 0]))
    pcm_ref, pcm_new = np.concatenate(ref_pcm[pcm_after]), np.concatenate(new_pcm[pcm_after])
    before = slice(0, encoder.takeovers[0][1])
    return {
        "feed_chunk": feed_chunk,
        "renewals": min(encoder.renewals, decoder.renewals),
        "takeovers": {"encoder": encoder.takeovers, "decoder": decoder.takeovers},
        "stalls": {"encoder": encoder.stalls, "decoder": decoder.stalls},
        "frames_compared_after_switch": {"codes": total - codes_after.start, "pcm": total - pcm_after.start},
        "codes_identical_after_switch": codes_equal,
        "first_codebook_identical_after_switch": first_codebook_equal,
        "codes_identical_before_switch": float(np.mean(np.stack(ref_codes[before]) == np.stack(new_codes[before]))),
        "decoded_max_abs_diff_after_switch": float(np.max(np.abs(pcm_ref - pcm_new))),
        "decoded_rms_after_switch": float(np.sqrt(np.mean(pcm_ref**2))),
        "seconds": elapsed,
    }


def frame_times(path: Path, count: int, feed_chunk: int, life: int) -> dict:
    codec = load_mimi(path, max_seq_len=2 * life, overlap_frames=6, feed_chunk=feed_chunk)
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
        "life": life,
        "feed_chunk": feed_chunk,
        "renewals": {"encoder": codec.encoder.renewals, "decoder": codec.decoder.renewals},
        "waits_for_a_load": codec.encoder.waits + codec.decoder.waits,
        "stalls": codec.encoder.stalls + codec.decoder.stalls,
        "frames_fed_beyond_the_overlap": [b - a - 6 for c in (codec.encoder, codec.decoder) for a, b in c.takeovers],
        "median_ms": round(float(np.median(ms)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "max_ms": round(float(ms.max()), 1),
        "max_over_median": round(float(ms.max() / np.median(ms)), 2),
        "slowest_frames": [(int(i) + 3, round(float(ms[i]), 1)) for i in np.argsort(ms)[::-1][:6]],
        "takeovers": {"encoder": codec.encoder.takeovers, "decoder": codec.decoder.takeovers},
    }


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (Linux: /proc/<pid>/stat, fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Measured(MimiProcess):
    """A Mimi process that notes its CPU time when first fed, when synced (taking over) and when closed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fed = self.answered = 0
        self.cpu_first_fed = self.cpu_synced = self.cpu_closed = None

    def run(self, direction, data):
        self.answered += 1
        return super().run(direction, data)

    def feed(self, direction, frames):
        if self.cpu_first_fed is None:
            self.cpu_first_fed = cpu_seconds(self.pid)
        self.fed += len(frames)
        super().feed(direction, frames)

    def sync(self):
        super().sync()
        if self.cpu_first_fed is not None and self.cpu_synced is None:
            self.cpu_synced = cpu_seconds(self.pid)

    def close(self):
        try:
            self.cpu_closed = cpu_seconds(self.pid)
        except OSError:  # it has ended already
            pass
        super().close()


def successor_cpu(path: Path, chunks: list[int], overlap: int, lead: int = 10) -> dict:
    """One renewal per direction and chunk size, `lead` frames after the start, one frame every 80 ms."""
    life = 2 * (overlap + 4 * max(chunks))
    count = life  # enough for a successor that catches up only at the end of its time
    inputs, model_codes = frames(count), np.random.default_rng(0).integers(0, 2048, (count, 8))
    results = {}
    for feed_chunk in chunks:
        for direction, data in ((ENCODE, inputs), (DECODE, model_codes)):
            made = []

            def start():
                made.append(Measured(path, max_seq_len=2 * life))
                return made[-1]

            coder = RenewingCoder(start, direction, overlap, first_renewal=lead, feed_chunk=feed_chunk)
            coder.wait_ready()
            old, walls, window, deadline = made[0], [], None, time.perf_counter()
            try:
                for i, x in enumerate(data):
                    deadline += 0.080
                    time.sleep(max(0.0, deadline - time.perf_counter()))
                    t = time.perf_counter()
                    coder(x)
                    walls.append(time.perf_counter() - t)
                    if window is None and coder._successor is not None:
                        window = (i + 1, cpu_seconds(old.pid), old.answered)
                    if coder.renewals:
                        break
            finally:
                coder.close()
            successor = made[1]
            fed_from, answers_from = coder.takeovers[0]
            ms = 1000 * np.array(walls[fed_from:answers_from + 1])
            results[f"{direction} k={feed_chunk}"] = {
                "successor_cpu_ms_per_frame_fed": round(1000 * (successor.cpu_synced - successor.cpu_first_fed)
                                                        / successor.fed, 1),
                "current_cpu_ms_per_frame_answered": round(1000 * (old.cpu_closed - window[1])
                                                           / (old.answered - window[2]), 1),
                "frames_fed": successor.fed,
                "frames_fed_beyond_the_overlap": answers_from - fed_from - overlap,
                "stalls": coder.stalls,
                "call_ms_during_renewal_median": round(float(np.median(ms)), 1),
                "call_ms_during_renewal_max": round(float(ms.max()), 1),
                "call_ms_at_takeover": round(float(ms[-1]), 1),
            }
            print(direction, feed_chunk, results[f"{direction} k={feed_chunk}"], file=sys.stderr, flush=True)
    return {"overlap": overlap, "paced_ms": 80, "loadavg_at_end": os.getloadavg(), "renewals": results}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("speed", "renewal", "frame-times", "successor-cpu"))
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--extra", type=int, default=40)
    p.add_argument("--feed-chunk", type=int, default=FEED_CHUNK_FRAMES, help="frames per call feeding a successor")
    p.add_argument("--life", type=int, default=80, help="frame-times: frames an instance lives")
    p.add_argument("--chunks", default="1,5", help="successor-cpu: the chunk sizes to compare")
    p.add_argument("--overlap", type=int, default=RENEWAL_OVERLAP_FRAMES, help="successor-cpu: frames fed")
    args = p.parse_args()
    path = random_mimi()
    load = os.getloadavg()
    if args.what == "speed":
        result = speed(path, args.frames)
    elif args.what == "renewal":
        result = renewal(path, args.extra, args.feed_chunk)
    elif args.what == "frame-times":
        result = frame_times(path, args.frames, args.feed_chunk, args.life)
    else:
        result = successor_cpu(path, [int(k) for k in args.chunks.split(",")], args.overlap)
    result["loadavg_at_start"] = load
    result["machine"] = describe_machine()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
