"""`python -m moshivis_mlx doctor` on this machine, run as users run it, with
parts of the machine taken away by stand-in modules on PYTHONPATH, offline and
with a Hugging Face cache made here (empty, or holding a tiny fake snapshot)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moshivis_mlx.app.doctor import EVERY_MODE, LIVE_MODE, Problem, Report
from moshivis_mlx.weights.hub import DEFAULT_REPO, MIMI_FILE, MODEL_FILES, TOKENIZER_FILE, default_bits

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = MODEL_FILES[default_bits()]  # the doctor runs on this machine: same memory, same pick

WORKING_AUDIO = """
    class PortAudioError(Exception):
        pass

    class _Default:
        device = [0, 1]

    default = _Default()
    _DEVICES = [
        {"name": "Test Microphone", "index": 0, "hostapi": 0, "max_input_channels": 1,
         "max_output_channels": 0, "default_samplerate": 44100.0},
        {"name": "Test Speakers", "index": 1, "hostapi": 0, "max_input_channels": 0,
         "max_output_channels": 2, "default_samplerate": 48000.0},
    ]

    def query_devices(device=None, kind=None):
        return _DEVICES if device is None else _DEVICES[device]

    def get_portaudio_version():
        return 1246720, "PortAudio V19 (test stand-in)"
"""
NO_PORTAUDIO = "raise OSError('PortAudio library not found')\n"  # what sounddevice raises without libportaudio


def stand_in(directory: Path, module: str, body: str) -> None:
    """`module` (dots make packages) replaced by `body` for processes with `directory` on PYTHONPATH."""
    *packages, name = module.split(".")
    target = directory.joinpath(*packages)
    target.mkdir(parents=True, exist_ok=True)
    for depth in range(len(packages)):
        directory.joinpath(*packages[: depth + 1], "__init__.py").touch()
    (target / f"{name}.py").write_text(textwrap.dedent(body))


def fake_snapshot(hf_home: Path, files: list[str]) -> None:
    """The layout huggingface_hub gives a download of `files` from the default repository (tiny contents)."""
    repo = hf_home / "hub" / f"models--{DEFAULT_REPO.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in files:
        (snapshot / name).write_bytes(b"not really weights")


def run_doctor(tmp_path: Path, stand_ins: Path | None = None, **extra_env: str) -> subprocess.CompletedProcess:
    """The doctor, offline, with its Hugging Face cache under tmp_path/hf."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MOSHIVIS_MLX_"))} | extra_env
    path = [str(stand_ins)] if stand_ins else []
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([*path, str(ROOT)]))
    return subprocess.run([sys.executable, "-m", "moshivis_mlx", "doctor"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)


def row(output: str, name: str) -> str:
    """The value printed on the row called `name`."""
    match = re.search(rf"^  {re.escape(name)} +(.*)$", output, re.MULTILINE)
    assert match, f"no row {name!r} in:\n{output}"
    return match.group(1)


def test_this_machine_offline_with_an_empty_cache(tmp_path):
    result = run_doctor(tmp_path)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert row(out, "moshivis_mlx").endswith(f"({ROOT / 'moshivis_mlx'})")  # this copy, not an installed one
    assert row(out, "device").startswith("cpu") and row(out, "CPU streams")
    assert row(out, "code path").startswith("cpu path")  # what load() will apply on this CPU
    assert DEFAULT_MODEL in row(out, "default weights")
    assert row(out, "HF cache") == f"{tmp_path / 'hf' / 'hub'} (offline: HF_HUB_OFFLINE)"
    assert row(out, "4-bit model") == f"{MODEL_FILES[4]}: not in the cache"
    assert "offline, and the default weights are not all cached" in out
    assert f"hf download {DEFAULT_REPO} {DEFAULT_MODEL} {MIMI_FILE} {TOKENIZER_FILE}" in out
    assert row(out, "static files").endswith("all present")
    assert "result: file mode blocked" in out  # by the weights, which --model etc. could still provide
    assert not (tmp_path / "hf" / "hub" / f"models--{DEFAULT_REPO.replace('/', '--')}").exists()  # nothing fetched


def test_cached_weights_and_working_audio_make_every_mode_ready(tmp_path):
    fake_snapshot(tmp_path / "hf", [DEFAULT_MODEL, MIMI_FILE, TOKENIZER_FILE])
    stand_in(tmp_path / "stand_ins", "sounddevice", WORKING_AUDIO)
    result = run_doctor(tmp_path, tmp_path / "stand_ins")
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert row(out, "Mimi") == f"{MIMI_FILE}: in the cache"
    assert row(out, "tokenizer") == f"{TOKENIZER_FILE}: in the cache"
    other = MODEL_FILES[8 if DEFAULT_MODEL == MODEL_FILES[4] else 4]
    assert f"{other}: not in the cache" in out
    assert "first run" not in out and "offline, and" not in out
    assert row(out, "PortAudio") == "PortAudio V19 (test stand-in)"
    assert row(out, "input") == "#0 Test Microphone: 44100 Hz, 1 channels"
    assert row(out, "output") == "#1 Test Speakers: 48000 Hz, 2 channels"
    if row(out, "backend").startswith("webrtc-aec3"):  # livekit installed, as the package requires
        assert "result: file mode ready, live mode ready, web page ready" in out, out


def test_without_portaudio_only_live_mode_is_blocked(tmp_path):
    fake_snapshot(tmp_path / "hf", [DEFAULT_MODEL, MIMI_FILE, TOKENIZER_FILE])
    stand_in(tmp_path / "stand_ins", "sounddevice", NO_PORTAUDIO)
    result = run_doctor(tmp_path, tmp_path / "stand_ins")
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert row(out, "PortAudio") == "not available"
    assert "! PortAudio was not found (PortAudio library not found)" in out
    fix = "libportaudio2" if sys.platform == "linux" else "pip install --force-reinstall sounddevice"
    assert re.search(rf"blocks: live mode\n    fix: .*{fix}", out), out
    assert "file mode ready, live mode blocked, web page ready" in out


def test_without_livekit_and_aiohttp_file_mode_still_runs(tmp_path):
    fake_snapshot(tmp_path / "hf", [DEFAULT_MODEL, MIMI_FILE, TOKENIZER_FILE])
    for module in ("livekit.__init__", "aiohttp.__init__"):
        stand_in(tmp_path / "stand_ins", module, f"raise ImportError('stand-in: no {module[:-9]}')\n")
    result = run_doctor(tmp_path, tmp_path / "stand_ins")
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert row(out, "backend") == "none" and "fix:    pip install livekit" in out
    assert "! aiohttp cannot be imported (ImportError: stand-in: no aiohttp)\n    blocks: web page" in out
    assert "result: file mode ready" in out and "web page blocked" in out


@pytest.mark.parametrize(
    "module,body,message,fix",
    [
        ("rustymimi", "raise ImportError('stand-in: no rustymimi')\n", "rustymimi (Mimi, the audio codec) cannot",
         "pip install rustymimi"),
        ("mlx.__init__", "raise ImportError('stand-in: no MLX')\n", "MLX cannot be imported (ImportError: stand-in",
         "pip install"),
    ],
    ids=["rustymimi", "mlx"],
)
def test_what_blocks_every_mode_fails_the_exit_status(tmp_path, module, body, message, fix):
    stand_in(tmp_path / "stand_ins", module, body)
    result = run_doctor(tmp_path, tmp_path / "stand_ins")
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert message in out and f"blocks: every mode\n    fix:    {fix}" in out
    assert out.rstrip().endswith("result: no mode can run until the problems above that block every mode are fixed")
    assert "echo cancellation" in out and "web page" in out  # the rest is still reported


def test_summary_names_each_blocked_mode():
    report = Report()
    assert report.summary() == "result: file mode ready, live mode ready, web page ready" and not report.fatal
    report.problems.append(Problem("slow", "faster"))
    report.problems.append(Problem("no microphone", "plug one", frozenset({LIVE_MODE})))
    assert report.summary() == "result: file mode ready, live mode blocked, web page ready" and not report.fatal
    report.problems.append(Problem("no MLX", "pip install mlx", EVERY_MODE, fatal=True))
    assert report.fatal and report.summary().startswith("result: no mode can run")
    rendered = report.render()
    assert "problems (3)" in rendered and "blocks: nothing (slower)" in rendered


def test_the_forced_gpu_path_is_shown(tmp_path):
    result = run_doctor(tmp_path, MOSHIVIS_MLX_FORCE_GPU_PATH="1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert row(result.stdout, "code path").startswith("gpu path (forced by MOSHIVIS_MLX_FORCE_GPU_PATH)")
    assert row(result.stdout, "quantized").startswith("weights computed in bfloat16")
