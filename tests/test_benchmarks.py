"""The step benchmark still runs and reports what the README quotes (a smoke test, not a timing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_dispatch_benchmark_reports_operations_and_steps():
    command = [sys.executable, str(BENCHMARKS / "bench_step.py"), "dispatch", "--steps", "3", "--warmup", "1", "--json"]
    command += ["--start-step", "2"]  # untimed steps first (3000 measures a full window)
    out = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["steps"] == 3 and result["compiled"] and result["image"]
    assert result["start_step"] == 2 and result["window_slots_read"] == "256-256"
    # The compiled step of the released depth: thousands of operations, fewer than uncompiled upstream's 9,501.
    assert 1000 < result["ops_per_step"] < 9501
    assert result["median_ms"] > 0


def test_session_memory_benchmark_loads_a_checkpoint_as_a_user_does():
    checkpoint = Path(__file__).parent / "fixtures" / "moshivis_tiny_a"  # 2 temporal layers, context 24
    command = [sys.executable, str(BENCHMARKS / "bench_session.py"), "memory", "--checkpoint", str(checkpoint)]
    out = subprocess.run(command + ["--steps", "30"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["model"] == str(checkpoint) and result["temporal_layers"] == 2 and result["dim"] == 128
    # RSS sampled once the window is full (step 24), half way and at the end; growth is measured from the first.
    assert set(result["rss_mb_at_step"]) == {"15", "24", "30"}
    assert result["growth_after_context_mb"] == round(result["rss_mb_at_step"]["30"] - result["rss_mb_at_step"]["24"], 1)


def test_conversation_benchmark_reports_serial_pipelined_and_real_time():
    command = [sys.executable, str(BENCHMARKS / "bench_conversation.py"), "--codec", "fake", "--frames", "12"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result["pipelined"]["stages"]) == {"encode", "model", "decode"}
    assert result["serial"]["period"]["median_ms"] > 0 and result["real_time"]["latency"]["median_ms"] > 0
    assert result["mimi_waits_for_a_load"] == 0 and result["date"]
