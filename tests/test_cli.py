"""`python -m moshivis_mlx` end to end in file mode, and its errors (no sound card needed)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from moshivis_mlx.audio.wav import read_wav, write_wav
from talk_support import speech_like

ROOT = Path(__file__).resolve().parent.parent
QUESTION_SECONDS, TAIL_SECONDS = 2.0, 1.0


def run_cli(*args, env: dict | None = None, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "moshivis_mlx", *map(str, args)], capture_output=True, text=True,
                          env=full_env, input=stdin, timeout=timeout, cwd=ROOT)


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error: ") or "\nerror: " in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


@pytest.fixture(scope="module")
def assets(tmp_path_factory, talking_checkpoint, mimi_path, tokenizer_path):
    d = tmp_path_factory.mktemp("cli")
    stereo48k = np.stack([speech_like(QUESTION_SECONDS, 48000), speech_like(QUESTION_SECONDS, 48000, seed=1)], 1)
    write_wav(d / "question.wav", stereo48k, 48000)  # not Mimi's rate, not mono: resampled and mixed down
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (80, 100, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(d / "picture0.png")  # a picture file, resized for the tiny SigLIP
    np.save(d / "picture1.npy", np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32))  # features
    weights = ["--model", talking_checkpoint, "--mimi", mimi_path, "--tokenizer", tokenizer_path, "--dtype", "float32"]
    return d, weights


def test_file_mode_end_to_end_and_reproducible(assets):
    d, weights = assets
    outputs = []
    for run in range(2):
        out, transcript = d / f"answer{run}.wav", d / f"answer{run}.txt"
        result = run_cli(*weights, "--input", d / "question.wav", "--output", out, "--transcript", transcript,
                         "--tail", TAIL_SECONDS, "--seed", 7,
                         "--image", d / "picture0.png", "--image", f"{d / 'picture1.npy'}@1.2")
        assert result.returncode == 0, result.stderr
        samples, rate = read_wav(out)
        expected = (QUESTION_SECONDS + TAIL_SECONDS) * rate
        assert rate == 24000 and samples.shape[1] == 1
        assert 0 <= len(samples) - expected < 1920  # input + tail, rounded up to whole 80 ms frames
        assert np.isfinite(samples).all() and np.abs(samples).max() > 0
        assert transcript.exists() and transcript.read_text().strip() == result.stdout.strip()
        outputs.append((out.read_bytes(), transcript.read_text()))
    assert outputs[0] == outputs[1]  # same seed, same answer, to the bit
    assert not [p for p in d.iterdir() if p.name.endswith(".partial")]


def write_stub_sounddevice(directory: Path, body: str) -> dict:
    """A `sounddevice` stand-in on PYTHONPATH, for machines with or without PortAudio."""
    directory.mkdir(exist_ok=True)
    (directory / "sounddevice.py").write_text(textwrap.dedent(body))
    return {"PYTHONPATH": f"{directory}{os.pathsep}{ROOT}"}


def test_missing_portaudio_is_explained_before_loading_anything(tmp_path):
    env = write_stub_sounddevice(tmp_path / "stub", "raise OSError('PortAudio library not found')\n")
    result = run_cli("--model", tmp_path, env=env)  # the model would fail: PortAudio is checked first
    assert_clean_error(result, "PortAudio was not found", "libportaudio2", "File mode")
    assert_clean_error(run_cli("--list-devices", env=env), "PortAudio was not found")


NO_MICROPHONE = """
    class PortAudioError(Exception):
        pass

    class _Default:
        device = [-1, 0]

    default = _Default()
    _DEVICES = [{"name": "Speakers", "index": 0, "hostapi": 0, "max_input_channels": 0,
                 "max_output_channels": 2, "default_samplerate": 48000.0}]

    def query_devices(device=None, kind=None):
        return _DEVICES if device is None else _DEVICES[device]
"""


def test_no_input_device(tmp_path):
    env = write_stub_sounddevice(tmp_path / "stub", NO_MICROPHONE)
    result = run_cli(env=env)
    assert_clean_error(result, "no audio input device found", "--list-devices")
    assert_clean_error(run_cli("--input-device", "3", env=env), "no audio input device")
    listing = run_cli("--list-devices", env=env)
    assert listing.returncode == 0 and "Speakers" in listing.stdout


def test_missing_echo_canceller_is_explained_before_loading_anything(tmp_path):
    env = write_stub_sounddevice(tmp_path / "stub", NO_MICROPHONE.replace(
        '"max_input_channels": 0', '"max_input_channels": 1').replace("device = [-1, 0]", "device = [0, 0]"))
    (tmp_path / "stub" / "livekit").mkdir()
    (tmp_path / "stub" / "livekit" / "__init__.py").write_text("raise ImportError('No module named livekit.rtc')\n")
    result = run_cli("--model", tmp_path, env=env)  # the model would fail: the canceller is checked first
    assert_clean_error(result, "pip install livekit", "--no-echo-cancel")


def test_unreadable_and_empty_wav(tmp_path, assets):
    _, weights = assets
    text = tmp_path / "notes.wav"
    text.write_text("these are not samples")
    result = run_cli(*weights, "--input", text, "--output", tmp_path / "out.wav")
    assert_clean_error(result, f"{text}: not a WAV file")
    empty = tmp_path / "empty.wav"
    write_wav(empty, np.zeros(0, np.float32), 24000)
    result = run_cli(*weights, "--input", empty, "--output", tmp_path / "out.wav")
    assert_clean_error(result, "holds no audio")
    assert_clean_error(run_cli("--input", tmp_path / "absent.wav", "--output", tmp_path / "o.wav"), "no such file")
    assert not (tmp_path / "out.wav").exists()


def test_unknown_model_path(tmp_path, assets, mimi_path, tokenizer_path):
    d, _ = assets
    result = run_cli("--model", tmp_path / "nowhere", "--input", d / "question.wav", "--output", tmp_path / "o.wav")
    assert_clean_error(result, f"--model {tmp_path / 'nowhere'}: no such file or directory")
    not_a_checkpoint = tmp_path / "empty_dir"
    not_a_checkpoint.mkdir()
    result = run_cli("--model", not_a_checkpoint, "--mimi", mimi_path, "--tokenizer", tokenizer_path,
                     "--input", d / "question.wav", "--output", tmp_path / "o.wav")
    assert_clean_error(result, "has no model.safetensors")


def test_offline_with_nothing_cached(tmp_path, assets):
    d, _ = assets
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = run_cli("-q", "4", "--input", d / "question.wav", "--output", tmp_path / "o.wav", env=env)
    assert_clean_error(result, "model.q4.safetensors", "tokenizer-e351c8d8-checkpoint125.safetensors",
                       "tokenizer_spm_32k_3.model", "HF_HUB_OFFLINE", "--model PATH")


def test_arguments_are_checked_first(tmp_path, assets):
    d, weights = assets
    assert_clean_error(run_cli("--output", tmp_path / "o.wav"), "--output needs --input")
    assert_clean_error(run_cli("--image", tmp_path / "absent.jpg"), "no such file")
    assert_clean_error(run_cli("--input", d / "question.wav", "--output", tmp_path / "no" / "o.wav"),
                       "directory does not exist")
    assert_clean_error(run_cli("--image", f"{d / 'picture0.png'}@3"), "file mode")
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((16, 7), np.float32))  # not the vision width
    assert_clean_error(run_cli(*weights, "--input", d / "question.wav", "--output", tmp_path / "o.wav",
                               "--image", f"{wrong}@1"), f"--image {wrong}: cannot use it")
    not_a_picture = tmp_path / "photo.jpg"
    not_a_picture.write_text("not a picture")
    assert_clean_error(run_cli(*weights, "--input", d / "question.wav", "--output", tmp_path / "o.wav",
                               "--image", not_a_picture), "cannot use it", "not an image")
    assert not (tmp_path / "o.wav").exists()
    assert_clean_error(run_cli("--max-lag", "0.05"), "at least one frame")
    assert run_cli("--model", "m", "-q", "4").returncode == 2  # argparse: one source of weights


def test_help_says_loudspeakers_work_and_how_to_turn_echo_cancellation_off():
    result = run_cli("--help")
    assert result.returncode == 0 and "echo cancellation" in result.stdout and "--no-echo-cancel" in result.stdout
    assert "use headphones" not in result.stdout.lower()
    assert "--debug-step-delay" not in result.stdout


def test_convert_dispatches_to_the_converter():
    result = run_cli("convert", "--help")
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert result.stdout.startswith("usage: python -m moshivis_mlx convert") and "--bits" in result.stdout
