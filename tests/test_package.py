"""Packaging promises: a side-effect-free import that works on Linux."""

from __future__ import annotations

import json
import subprocess
import sys

import moshivis_mlx as mv


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
