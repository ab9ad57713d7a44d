"""Resolving the three files: local paths, the Hugging Face cache, and the offline error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx

from moshivis_mlx.weights.hub import (
    DEFAULT_REPO,
    MIMI_FILE,
    MODEL_FILES,
    TOKENIZER_FILE,
    default_bits,
    load_model,
    resolve_files,
)

ROOT = Path(__file__).resolve().parent.parent


def resolve_in_subprocess(hf_home: Path, **kwargs) -> subprocess.CompletedProcess:
    """huggingface_hub reads HF_HOME / HF_HUB_OFFLINE when imported: use a fresh process."""
    code = (
        "import json, sys; from moshivis_mlx.weights.hub import resolve_files\n"
        f"files = resolve_files(**json.loads({json.dumps(json.dumps(kwargs))}))\n"
        "print(json.dumps({k: str(v) for k, v in vars(files).items()}))"
    )
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_default_bits_follow_memory():
    assert default_bits(24 * 2**30, chip=None) == 8
    assert default_bits(64 * 2**30, chip=None) == 8
    assert default_bits(16 * 2**30, chip=None) == 4
    assert default_bits(None) in (4, 8)


def test_base_chips_get_the_4bit_model_whatever_their_memory():
    """The 8-bit model's full-window step reads 10.24 GB: 85 ms on an M4's 120 GB/s, over an 80 ms frame."""
    for chip in ("M1", "M2", "M3", "M4", "M3 Pro"):
        assert default_bits(32 * 2**30, chip=chip) == 4, chip
    for chip in ("M1 Pro", "M2 Max", "M4 Pro", "M4 Max", "M2 Ultra"):
        assert default_bits(32 * 2**30, chip=chip) == 8, chip
    assert default_bits(16 * 2**30, chip="M4 Max") == 4  # memory first
    assert default_bits(32 * 2**30, chip="M9") == 8  # an unknown chip: memory alone


def test_offline_with_nothing_cached_names_every_missing_file(tmp_path):
    result = resolve_in_subprocess(tmp_path / "hf", bits=8)
    assert result.returncode != 0
    error = result.stderr.strip().splitlines()
    message = "\n".join(error[error.index(next(l for l in error if "MissingFilesError" in l)) :])
    for needed in (MODEL_FILES[8], MIMI_FILE, TOKENIZER_FILE, "HF_HUB_OFFLINE", "--model", "--mimi", "--tokenizer",
                   f"hf download {DEFAULT_REPO}"):
        assert needed in message


def test_offline_uses_the_cache(tmp_path):
    """Files downloaded earlier are found without the network, in huggingface_hub's cache layout."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = tmp_path / "hf" / "hub" / ("models--" + DEFAULT_REPO.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    for name in (MODEL_FILES[4], MIMI_FILE, TOKENIZER_FILE):
        (snapshot / name).write_bytes(b"x")
    result = resolve_in_subprocess(tmp_path / "hf", bits=4)
    assert result.returncode == 0, result.stderr
    files = json.loads(result.stdout)
    assert files == {"model": str(snapshot / MODEL_FILES[4]), "mimi": str(snapshot / MIMI_FILE),
                     "tokenizer": str(snapshot / TOKENIZER_FILE), "bits": "4"}


def test_local_files_need_no_hub(tmp_path):
    result = resolve_in_subprocess(tmp_path / "hf", model="m", mimi="a", tokenizer="t")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"model": "m", "mimi": "a", "tokenizer": "t", "bits": "None"}
    assert resolve_files(model="~/m", mimi="a", tokenizer="t").model == Path.home() / "m"


def test_load_model_loads_a_local_checkpoint(talking_checkpoint, talking_model):
    model = load_model(talking_checkpoint, dtype="float32")
    assert model.cfg == talking_model.cfg and model.dtype == mx.float32
