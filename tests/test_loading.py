"""Loading the released PyTorch layout, and clear errors for bad checkpoints."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import save_file

import moshivis_mlx as mv
from moshivis_mlx.weights.checkpoint import read_header

from conftest import FIXTURE_A


def load_file(path) -> dict[str, mx.array]:
    return mx.load(str(path))


def save_bf16(tensors: dict[str, mx.array], path) -> None:
    mx.save_safetensors(str(path), tensors)


@pytest.fixture
def checkpoint_dir(tmp_path):
    """A writable copy of fixture A's checkpoint and config."""
    for name in ("model.safetensors", "config.json"):
        shutil.copy(FIXTURE_A / name, tmp_path / name)
    return tmp_path


def test_every_tensor_used_once_and_every_parameter_filled():
    model = mv.load(FIXTURE_A, dtype="bfloat16")
    header = read_header(FIXTURE_A / "model.safetensors")
    params = dict(tree_flatten(model.parameters()))
    stored = sum(int(np.prod(v["shape"])) for v in header.values())
    assert sum(p.size for p in params.values()) == stored
    assert all(p.dtype == mx.bfloat16 for p in params.values())  # bf16 preserved


def test_shared_cross_attention_stored_once():
    model = mv.load(FIXTURE_A)
    names = [n for n, _ in tree_flatten(model.parameters()) if "q_proj" in n and "vision" not in n]
    assert names == ["transformer.cross_attention.q_proj.weight"]


def test_directory_and_file_load_the_same(checkpoint_dir):
    a = dict(tree_flatten(mv.load(checkpoint_dir).parameters()))
    b = dict(tree_flatten(mv.load(checkpoint_dir / "model.safetensors").parameters()))
    assert a.keys() == b.keys()
    assert all(mx.array_equal(a[k], b[k]) for k in a)


def test_truncated_file(checkpoint_dir):
    path = checkpoint_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(mv.CheckpointError, match=r"model\.safetensors: truncated"):
        mv.load(checkpoint_dir)


def test_missing_tensor(checkpoint_dir):
    path = checkpoint_dir / "model.safetensors"
    tensors = load_file(path)
    del tensors["depformer_in.3.weight"]
    save_bf16(tensors, path)
    with pytest.raises(mv.CheckpointError, match=r"missing 1 tensor\(s\): depformer_in\.3\.weight"):
        mv.load(checkpoint_dir)


def test_unexpected_tensor(checkpoint_dir):
    path = checkpoint_dir / "model.safetensors"
    tensors = load_file(path)
    tensors["llm.extra.weight"] = mx.zeros((2, 2))
    save_bf16(tensors, path)
    with pytest.raises(mv.CheckpointError, match=r"unexpected tensor\(s\) for this model: llm\.extra\.weight"):
        mv.load(checkpoint_dir)


def test_wrong_shape(checkpoint_dir):
    path = checkpoint_dir / "model.safetensors"
    tensors = load_file(path)
    tensors["llm.text_linear.weight"] = tensors["llm.text_linear.weight"][:-1]
    save_bf16(tensors, path)
    with pytest.raises(mv.CheckpointError, match=r"text_linear\.weight \(63, 128\) \(model expects \(64, 128\)\)"):
        mv.load(checkpoint_dir)


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_text("this is a text file, not weights\n" * 10)
    with pytest.raises(mv.CheckpointError, match="not a safetensors file"):
        mv.load(path)


def test_foreign_safetensors_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"encoder.weight": np.zeros((3, 3), np.float32)}, path)
    with pytest.raises(mv.CheckpointError, match="not a MoshiVis checkpoint"):
        mv.load(path)


def test_missing_path(tmp_path):
    with pytest.raises(mv.CheckpointError, match="no such file or directory"):
        mv.load(tmp_path / "nope")


def test_directory_without_checkpoint(tmp_path):
    with pytest.raises(mv.CheckpointError, match="has no model.safetensors"):
        mv.load(tmp_path)


def test_without_config_the_released_preset_is_assumed(tmp_path):
    shutil.copy(FIXTURE_A / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(mv.CheckpointError, match="released 'moshika-vis' sizes were assumed"):
        mv.load(tmp_path)


def test_bad_dtype():
    with pytest.raises(ValueError, match="dtype must be one of"):
        mv.load(FIXTURE_A, dtype="int8")


def test_dtype_as_a_name_or_an_mx_dtype():
    by_name, by_dtype = mv.load(FIXTURE_A, dtype="float32"), mv.load(FIXTURE_A, dtype=mx.float32)
    assert by_name.dtype == by_dtype.dtype == mx.float32
    assert mv.load(FIXTURE_A, dtype=mx.bfloat16).dtype == mx.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of"):
        mv.load(FIXTURE_A, dtype=mx.int32)


def test_config_as_a_model_config_a_dict_or_a_path(checkpoint_dir, tmp_path):
    """The sizes of fixture A come from the argument: the weights alone sit with no config.json."""
    weights = tmp_path / "weights" / "model.safetensors"
    weights.parent.mkdir()
    shutil.copy(checkpoint_dir / "model.safetensors", weights)
    config_path = checkpoint_dir / "config.json"
    as_dict = json.loads(config_path.read_text())
    expected = dict(tree_flatten(mv.load(checkpoint_dir, dtype="float32").parameters()))
    for config in (mv.ModelConfig.from_dict(as_dict), as_dict, config_path, str(config_path), checkpoint_dir):
        model = mv.load(weights, dtype="float32", config=config)
        assert model.cfg == mv.ModelConfig.from_dict(as_dict)
        got = dict(tree_flatten(model.parameters()))
        assert got.keys() == expected.keys() and all(mx.array_equal(got[k], expected[k]) for k in got)


def test_a_bad_config_argument_is_reported_plainly(tmp_path):
    with pytest.raises(mv.CheckpointError, match="no such config file"):
        mv.load(FIXTURE_A, config=tmp_path / "missing.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(mv.CheckpointError, match="invalid model config"):
        mv.load(FIXTURE_A, config=tmp_path / "config.json")
    with pytest.raises(ValueError, match="invalid model config"):
        mv.load(FIXTURE_A, config={"width": 128})
    with pytest.raises(TypeError, match="config must be a ModelConfig, a dict or the path"):
        mv.load(FIXTURE_A, config=42)
