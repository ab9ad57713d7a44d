"""The examples run as a user would run them, on the tiny stand-ins."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from moshivis_mlx.audio.wav import read_wav, write_wav
from talk_support import speech_like

ROOT = Path(__file__).resolve().parent.parent


def run_example(name: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "examples" / name), *map(str, args)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


def local_files(talking_checkpoint, mimi_path, tokenizer_path) -> list:
    return ["--model", talking_checkpoint, "--mimi", mimi_path, "--tokenizer", tokenizer_path, "--dtype", "float32"]


def pictures(directory: Path) -> list[Path]:
    """A picture file and a .npy of SigLIP features: the examples take both."""
    from PIL import Image

    picture, features = directory / "picture.png", directory / "features.npy"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(picture)
    np.save(features, np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32))
    return [picture, features]


def test_offline_demo(tmp_path, talking_checkpoint, mimi_path, tokenizer_path):
    write_wav(tmp_path / "question.wav", speech_like(1.5, 16000), 16000)
    result = run_example("offline_demo.py", "--image", pictures(tmp_path)[0], "--question", tmp_path / "question.wav",
                         "--answer", tmp_path / "answer.wav", "--transcript", tmp_path / "answer.txt",
                         "--seconds-to-answer", 1.0, *local_files(talking_checkpoint, mimi_path, tokenizer_path))
    assert result.returncode == 0, result.stderr
    samples, rate = read_wav(tmp_path / "answer.wav")
    assert rate == 24000 and 0 <= len(samples) - 2.5 * rate < 1920 and np.isfinite(samples).all()
    assert (tmp_path / "answer.txt").read_text().strip() == result.stdout.splitlines()[0].strip()


def test_embedding_example(tmp_path, talking_checkpoint, mimi_path, tokenizer_path):
    first, second = pictures(tmp_path)
    result = run_example("embed_conversation.py", "--image", first, "--image2", second, "--seconds", 2.0,
                         *local_files(talking_checkpoint, mimi_path, tokenizer_path))
    assert result.returncode == 0, result.stderr
    assert "25 frames answered (2.0 s)" in result.stdout
