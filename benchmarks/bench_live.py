"""Live mode end to end, as a user runs it, through a real-time-paced virtual sound card.

    python benchmarks/bench_live.py [--seconds 30] [--rate 24000] [--period 1920] [-- extra CLI flags]

Starts a JACK server with its dummy backend (a clock like a sound card's, no
hardware: Debian's `jackd2`, with `libportaudio2`), then `python -m
moshivis_mlx` on the tests' tiny model (random weights) and a full-size Mimi
with random weights, for `--seconds`. Reports what the user would notice:
dropped input frames, speaker underruns (seconds of silence), lag, the
latency from a frame's push to its answer and the stages' times; start-up
(the first frames after the streams open) included.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def start_jack(rate: int, period: int, log: Path) -> tuple[subprocess.Popen, dict]:
    if shutil.which("jackd") is None:
        sys.exit("jackd not found: apt-get install jackd2 libportaudio2")
    name = f"moshivis-bench-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "JACK_DEFAULT_SERVER": name, "JACK_NO_START_SERVER": "1", "JACK_NO_AUDIO_RESERVATION": "1"}
    proc = subprocess.Popen(["jackd", "--no-realtime", "-n", name, "-d", "dummy", "-r", str(rate), "-p", str(period)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    for _ in range(150):
        if subprocess.run(["jack_lsp"], env=env, capture_output=True).returncode == 0:
            return proc, env
        time.sleep(0.2)
    proc.kill()
    sys.exit(f"jackd did not start: {log.read_text()}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--rate", type=int, default=24000)
    p.add_argument("--period", type=int, default=1920)
    p.add_argument("extra", nargs="*", help="more flags for python -m moshivis_mlx (after --)")
    args = p.parse_args()

    from machine import describe_machine
    from talk_support import build_model, random_mimi, save_checkpoint, train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = save_checkpoint(build_model(), tmp / "model")
        tokenizer = train_tokenizer(tmp / "spm.model")
        jack, env = start_jack(args.rate, args.period, tmp / "jackd.log")
        stats_path = tmp / "stats.json"
        try:
            command = [sys.executable, "-m", "moshivis_mlx", "--model", str(checkpoint), "--mimi", str(random_mimi()),
                       "--tokenizer", str(tokenizer), "--dtype", "float32", "--duration", str(args.seconds),
                       "--debug-stats-json", str(stats_path), *args.extra]
            run = subprocess.run(command, env={**env, "PYTHONPATH": str(ROOT)}, stdin=subprocess.DEVNULL,
                                 capture_output=True, text=True, timeout=args.seconds + 300)
        finally:
            jack.terminate()
            jack.wait(timeout=10)
        if run.returncode != 0:
            sys.exit(f"live mode failed ({run.returncode}):\n{run.stderr[-3000:]}")
        stats = json.loads(stats_path.read_text())
    summary = run.stderr.strip().splitlines()[-1]
    print(json.dumps({
        "seconds": round(stats["seconds"], 1),
        "steps": stats["steps"],
        "dropped_frames": stats["dropped_frames"],
        "underruns": stats["underruns"],
        "underrun_seconds": round(stats["underrun_seconds"], 2),
        "max_lag_seconds": round(stats["max_lag_seconds"], 3),
        "mean_latency_ms": round(1000 * stats["mean_latency_seconds"], 1),
        "max_latency_ms": round(1000 * stats["latency_seconds_max"], 1),
        "mean_stage_ms": {k: round(1000 * v, 1) for k, v in stats["mean_stage_seconds"].items()},
        "input_overflows": stats["input_overflows"],
        "drop_times_s": stats["drop_times"],
        "underrun_times_s": stats["underrun_times"],
        "mimi_takeovers": {k: v["takeovers"] for k, v in stats.get("mimi", {}).items()},  # (first fed, first answered)
        "mimi_stalls": {k: v["stalls"] for k, v in stats.get("mimi", {}).items()},
        "device": f"JACK dummy {args.rate} Hz, period {args.period}",
        "extra_flags": args.extra,
        "summary": summary,
        "machine": describe_machine(),
        "date": datetime.date.today().isoformat(),
    }, indent=1))


if __name__ == "__main__":
    main()
