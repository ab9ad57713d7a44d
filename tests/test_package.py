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


def test_loading_and_sampling_do_not_drag_in_transformers():
    """mlx_lm's samplers are reused without importing mlx_lm's package (transformers, torch: ~10 s)."""
    code = (
        "import sys, numpy as np, moshivis_mlx as mv; mv.load; import convert.cli; "
        "cfg = mv.ModelConfig(dim=32, num_layers=1, num_heads=2, ffn_hidden=32, context=4, text_card=40, "
        "audio_card=24, num_audio_codebooks=4, delays=(0, 0, 1, 0, 1), gate_hidden=16, "
        "depformer=mv.DepformerConfig(dim=16, num_layers=1, num_heads=2, ffn_hidden=16, num_steps=2)); "
        "s = mv.MoshiVis(cfg).stream(sampler=mv.SamplerConfig(seed=0, repetition_penalty=1.1)); "
        "[np.array(s.step(np.zeros(2, np.int32)).text_logits) for _ in range(3)]; "
        "print(sorted(m for m in ('transformers', 'torch', 'mlx_lm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
