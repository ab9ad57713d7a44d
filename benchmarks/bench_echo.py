"""CPU cost of echo cancellation per 80 ms frame (the live loop's budget is 80 ms).

    nice -n 10 python benchmarks/bench_echo.py [--seconds 20] [--json]

Feeds `moshivis_mlx.EchoCanceller` 1920-sample blocks of a synthetic
conversation (a harmonic, amplitude-modulated voice played through a short
room with 40 ms latency, a second voice near the microphone) and times each
`process` call, with the echo-delay watch on (the default) and off. The first
second is not timed (the backend allocates as it starts).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import describe_machine  # noqa: E402
from moshivis_mlx.audio.echo import EchoCanceller  # noqa: E402

RATE = 24000
BLOCK = 1920  # 80 ms
WARMUP_SECONDS = 1.0


def voice(seconds: float, pitch: float, seed: int) -> np.ndarray:
    """Harmonics of a wandering pitch under a syllable-rate envelope, with a little noise: speech-like."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    wander = np.repeat(rng.normal(0.0, 0.08, len(t) // 480 + 1), 480)[: len(t)]  # a new pitch every 20 ms
    phase = 2 * np.pi * np.cumsum(pitch * (1.0 + np.convolve(wander, np.ones(960) / 960, "same"))) / RATE
    harmonics = sum(np.sin(k * phase + k) / k for k in range(1, 12))
    envelope = np.clip(np.sin(2 * np.pi * 2.5 * t + seed), 0.0, None)
    return (0.1 * envelope * harmonics + 0.003 * rng.standard_normal(len(t))).astype(np.float32)


def scene(seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """(mic, played): the echo of `played` after 40 ms and a small room, plus a user's voice."""
    played = voice(seconds, 210.0, seed=1)
    rng = np.random.default_rng(2)
    room = rng.standard_normal(int(0.1 * RATE)) * np.exp(-np.arange(int(0.1 * RATE)) / (0.02 * RATE)) * 0.05
    room[0] = 0.5
    path = np.concatenate([np.zeros(int(0.04 * RATE)), room])
    echo = np.convolve(played, path)[: len(played)]
    user = voice(seconds, 120.0, seed=3) * (np.arange(len(played)) > len(played) // 2)  # double talk in the 2nd half
    return (echo + user).astype(np.float32), played


def time_blocks(canceller: EchoCanceller, mic: np.ndarray, played: np.ndarray) -> np.ndarray:
    """Seconds per `process` call, after the warm-up."""
    times = []
    for i in range(0, len(mic) - BLOCK + 1, BLOCK):
        start = time.perf_counter()
        canceller.process(mic[i : i + BLOCK], played[i : i + BLOCK])
        times.append(time.perf_counter() - start)
    return np.array(times[int(WARMUP_SECONDS * RATE / BLOCK) :])


def machine() -> str:
    return f"{describe_machine()}, Python {platform.python_version()}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=20.0, help="audio processed per configuration")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = p.parse_args()
    mic, played = scene(args.seconds + WARMUP_SECONDS)
    cancellers = {"with_delay_watch": EchoCanceller(RATE), "aec_only": EchoCanceller(RATE, delay=None)}
    result = {"machine": machine(), "date": datetime.date.today().isoformat()}
    result["backend"] = cancellers["aec_only"].backend
    for name, canceller in cancellers.items():
        times = 1000 * time_blocks(canceller, mic, played)
        result["frames_timed"] = len(times)
        result[name] = {
            "median_ms": round(float(np.median(times)), 3),
            "p99_ms": round(float(np.percentile(times, 99)), 3),
            "max_ms": round(float(times.max()), 3),
        }
    result["echo_delay_ms"] = cancellers["with_delay_watch"].echo_delay_ms  # the scene's is 40 ms
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['machine']}; {result['date']}; {result['backend']}")
    print(f"{result['frames_timed']} frames of 80 ms (1920 samples at 24 kHz); echo delay found: "
          f"{result['echo_delay_ms']} ms (40 in the scene)")
    for name in ("with_delay_watch", "aec_only"):
        r = result[name]
        print(f"  {name:17s} median {r['median_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  max {r['max_ms']:.3f} ms"
              f"  ({100 * r['median_ms'] / 80:.2f}% of the frame)")


if __name__ == "__main__":
    main()
