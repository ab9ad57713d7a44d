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


def test_bytes_benchmark_prints_one_line_per_policy_and_the_default_meets_issue_21():
    out = subprocess.run([sys.executable, str(BENCHMARKS / "bench_bytes.py")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = {r["policy"]: r for r in map(json.loads, out.stdout.strip().splitlines())}
    before, default = lines["q4 mixed before"], lines["q4 mixed (default)"]
    assert before["with_image_full_window_gb"]["total"] == 7.874  # what issue 21 measured
    full = default["with_image_full_window_gb"]
    assert full["total"] <= 6.0 and (default["kv_bits"], default["image_kv_bits"]) == (4, 8)
    assert abs(full["total"] - sum(v for k, v in full.items() if k != "total")) < 0.005  # parts rounded to 1 MB


def test_quantization_benchmark_reports_errors_and_agreement_per_setup():
    command = [sys.executable, str(BENCHMARKS / "bench_quantization.py"), "--json"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {r["setup"]: r for r in map(json.loads, out.stdout.strip().splitlines())}
    assert rows["bf16"]["text_error_vs_official"] < 3e-5 and rows["bf16"]["greedy_agreement_vs_official"] == 1.0
    default = rows["q4 mixed (default)"]
    assert default["with_image_full_window_gb"] <= 6.0
    assert default["text_error_vs_official"] <= rows["q4 uniform (as upstream)"]["text_error_vs_official"]
