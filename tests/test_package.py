"""Packaging promises: a side-effect-free import that works on Linux; one installed package, moshivis_mlx."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import moshivis_mlx as mv

ROOT = Path(__file__).resolve().parent.parent


def test_import_has_no_side_effects():
    code = (
        "import sys, os; env = dict(os.environ); import moshivis_mlx; "
        "assert env == dict(os.environ); "
        "print(sorted(m for m in ('sounddevice', 'rustymimi', 'huggingface_hub', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert out.stderr == ""


def test_config_round_trips_through_json():
    cfg = mv.moshika_vis()
    again = mv.ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_released_preset_sizes():
    cfg = mv.moshika_vis()
    assert (cfg.dim, cfg.num_layers, cfg.num_heads, cfg.ffn_hidden, cfg.context) == (4096, 32, 32, 11264, 3000)
    assert (cfg.text_card, cfg.audio_card, cfg.num_audio_codebooks) == (32000, 2048, 16)
    dep = cfg.depformer
    assert (dep.dim, dep.num_layers, dep.num_heads, dep.ffn_hidden, dep.num_steps) == (1024, 6, 16, 2816, 8)
    assert (cfg.gate_hidden, cfg.vision.width, cfg.xa_start) == (512, 1152, 16)
    assert cfg.delays == (0,) + (0,) + (1,) * 7 + (0,) + (1,) * 7


def test_unknown_config_key_is_rejected():
    import pytest

    with pytest.raises(ValueError, match="unknown config keys: dims"):
        mv.ModelConfig.from_dict({"dims": 3})


def test_loading_and_sampling_do_not_drag_in_transformers():
    """mlx_lm's samplers are reused without importing mlx_lm's package (transformers, torch: ~10 s)."""
    code = (
        "import sys, numpy as np, moshivis_mlx as mv; mv.load; import moshivis_mlx.weights.convert.cli; "
        "cfg = mv.ModelConfig(dim=32, num_layers=1, num_heads=2, ffn_hidden=32, context=4, text_card=40, "
        "audio_card=24, num_audio_codebooks=4, delays=(0, 0, 1, 0, 1), gate_hidden=16, "
        "depformer=mv.DepformerConfig(dim=16, num_layers=1, num_heads=2, ffn_hidden=16, num_steps=2)); "
        "s = mv.MoshiVis(cfg).stream(sampler=mv.SamplerConfig(seed=0, repetition_penalty=1.1)); "
        "[np.array(s.step(np.zeros(2, np.int32)).text_logits) for _ in range(3)]; "
        "print(sorted(m for m in ('transformers', 'torch', 'mlx_lm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_blas_and_malloc_import_nothing_from_mlx():
    """They must run before MLX is loaded: `python -m moshivis_mlx` and the examples import them first."""
    code = (
        "import sys; import moshivis_mlx.__main__, moshivis_mlx.cpu.blas, moshivis_mlx.cpu.malloc; "
        "print(sorted(m for m in sys.modules if m == 'mlx' or m.startswith('mlx.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_the_wheel_installs_moshivis_mlx_only_and_its_converter_runs(tmp_path):
    """No top-level `convert` package (it would shadow any other of that name): the converter is
    `moshivis_mlx.weights.convert`, reached through `python -m moshivis_mlx convert` and `moshivis-mlx-convert`."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("moshivis_mlx", "convert"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "wheel"), str(source)], check=True, capture_output=True, timeout=120)
    (wheel,) = (tmp_path / "wheel").glob("moshivis_mlx-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(tmp_path / "installed")
        entry_points = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert {name.split("/")[0] for name in names} == {"moshivis_mlx", wheel.name.split("-py")[0] + ".dist-info"}
    assert "moshivis_mlx/weights/convert/cli.py" in names
    assert "moshivis_mlx/app/web/static/index.html" in names
    assert "moshivis-mlx-convert = moshivis_mlx.__main__:convert" in entry_points

    env = {**os.environ, "PYTHONPATH": str(tmp_path / "installed")}  # the wheel's files only, run from elsewhere
    for command in (["-m", "moshivis_mlx", "convert", "--help"],
                    ["-c", "import sys; from moshivis_mlx.__main__ import convert; sys.exit(convert(['--help']))"]):
        out = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env, cwd=tmp_path,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("usage: python -m moshivis_mlx convert") and "--bits" in out.stdout
    where = subprocess.run([sys.executable, "-c", "import moshivis_mlx; print(moshivis_mlx.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, check=True)
    assert where.stdout.strip() == str(tmp_path / "installed" / "moshivis_mlx" / "__init__.py")
