"""The `convert` command: every released layout in, our checkpoint out, safely.

Failure tests check the one-line message and that no output directory (and no
hidden partial directory) is left behind.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from safetensors.numpy import save_file

import moshivis_mlx as mv
from moshivis_mlx.weights.convert.cli import EXIT_ERROR, EXIT_INTERRUPTED, main
from moshivis_mlx.weights.convert.converter import convert_checkpoint, save_model
from moshivis_mlx.weights import checkpoint

from fixture_a import FIXTURE_A, TOLERANCE, UPSTREAM, UPSTREAM_FILES, assert_same_params, fixture_config, logit_errors

CONFIG = str(FIXTURE_A / "config.json")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


@pytest.fixture(scope="module")
def cfg():
    return fixture_config()


@pytest.fixture(scope="module")
def direct_bf16(cfg):
    return mv.load(FIXTURE_A, config=cfg)


@pytest.mark.parametrize("source", ["pytorch", "bf16", "q8", "q4"])
def test_every_released_file_converts_and_loads(tmp_path, capsys, cfg, direct_bf16, source):
    path = FIXTURE_A if source == "pytorch" else UPSTREAM / UPSTREAM_FILES[source]
    code, out, err = run(capsys, path, tmp_path / "out", "--config", CONFIG)
    assert code == 0, err
    assert "wrote" in out
    assert sorted(leftovers(tmp_path / "out")) == ["config.json", "model.safetensors"]
    converted = mv.load(tmp_path / "out")  # config.json written by convert: no config= needed
    if source in ("pytorch", "bf16"):
        assert_same_params(converted, direct_bf16)
    else:
        assert_same_params(converted, mv.load(path, config=cfg))
        quantization = json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]
        assert quantization["bits"] == {"q8": 8, "q4": 4}[source]
    text_err, audio_err = logit_errors(converted)
    text_tol, audio_tol = TOLERANCE["bf16" if source == "pytorch" else source]
    assert text_err < text_tol and audio_err < audio_tol, (text_err, audio_err)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_conversion_equals_quantize_on_load(tmp_path, capsys, cfg, bits):
    code, _, err = run(capsys, FIXTURE_A, tmp_path / "out", "--bits", bits)
    assert code == 0, err
    assert_same_params(mv.load(tmp_path / "out"), mv.load(FIXTURE_A, config=cfg, bits=bits))


def test_round_trip_is_bit_identical(tmp_path, capsys):
    assert run(capsys, FIXTURE_A, tmp_path / "a", "--bits", 4)[0] == 0
    first = mv.load(tmp_path / "a", dtype="bfloat16")  # the dtype it was written in
    save_model(first, tmp_path / "b")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert_same_params(mv.load(tmp_path / "b", dtype="bfloat16"), first)


def test_converting_a_converted_directory_is_an_identity_or_an_error(tmp_path, capsys):
    assert run(capsys, FIXTURE_A, tmp_path / "q4", "--bits", 4)[0] == 0
    original = (tmp_path / "q4" / "model.safetensors").read_bytes()
    # Without --bits, or with the same request: the same file again.
    for extra in ([], ["--bits", "4"]):
        code, out, err = run(capsys, tmp_path / "q4", tmp_path / "again", "--force", *extra)
        assert code == 0, err
        assert (tmp_path / "again" / "model.safetensors").read_bytes() == original
    # Any other quantization would stack two roundings: refused, nothing written.
    code, out, err = run(capsys, tmp_path / "q4", tmp_path / "q8", "--bits", 8)
    assert code == EXIT_ERROR and "already quantized" in err
    assert not (tmp_path / "q8").exists()


def test_dtype_and_policy_options(tmp_path, capsys):
    code, _, err = run(capsys, FIXTURE_A, tmp_path / "out", "--bits", 4, "--policy", "uniform", "--group-size", 32,
                       "--dtype", "float32", "--vision-bits", 8)
    assert code == 0, err
    model = mv.load(tmp_path / "out", dtype="float32")
    assert model.text_linear.bits == 4 and model.text_linear.scales.dtype == mx.float32
    assert model.vision.encoder.layers[0].mlp.fc1.bits == 8
    header = checkpoint.read_header(tmp_path / "out" / "model.safetensors")
    assert header["out_norm.weight"]["dtype"] == "F32"
    code, _, err = run(capsys, FIXTURE_A, tmp_path / "keep", "--bits", 4, "--sensitive-bits", "none")
    assert code == 0, err
    model = mv.load(tmp_path / "keep")
    assert isinstance(model.text_linear, nn.Linear) and model.transformer.layers[0].gating.linear_in.bits == 4


def test_output_holding_the_input_is_refused(tmp_path, capsys):
    src = _copy_fixture(tmp_path)
    code, _, err = run(capsys, src, src, "--bits", 4, "--force")
    assert code == EXIT_ERROR and "holds the input" in err
    assert leftovers(src) == ["config.json", "model.safetensors"]


def test_report_on_an_already_quantized_input(tmp_path, capsys):
    code, out, err = run(capsys, UPSTREAM / UPSTREAM_FILES["q4"], tmp_path / "out", "--config", CONFIG, "--report")
    assert code == 0, err
    assert "bits per weight:" in out and "no unquantized model" in out


def test_report_prints_size_and_quality(tmp_path, capsys):
    code, out, err = run(capsys, FIXTURE_A, tmp_path / "out", "--bits", 4, "--report")
    assert code == 0, err
    assert "bits per weight:" in out and "GB" in out
    assert "teacher-forced logit error" in out and "greedy-token agreement" in out
    text_error = float(out.split("text ")[1].split()[0])
    assert 0 < text_error < TOLERANCE["q4"][0]


# -- failures ---------------------------------------------------------------


def _copy_fixture(tmp_path: Path, tensors: dict | None = None) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(FIXTURE_A / "config.json", src)
    if tensors is None:
        shutil.copy(FIXTURE_A / "model.safetensors", src)
    else:
        save_file(tensors, str(src / "model.safetensors"))
    return src


def _bf16_tensors() -> dict:
    from safetensors.torch import load_file as torch_load

    return torch_load(str(FIXTURE_A / "model.safetensors"))


def _assert_failed_cleanly(tmp_path: Path, code: int, err: str, *fragments: str) -> None:
    assert code == EXIT_ERROR
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line
    for fragment in fragments:
        assert fragment in err, err
    assert not (tmp_path / "out").exists()
    assert not [n for n in leftovers(tmp_path) if "partial" in n]


def test_truncated_input(tmp_path, capsys):
    src = _copy_fixture(tmp_path)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, _, err = run(capsys, src, tmp_path / "out")
    _assert_failed_cleanly(tmp_path, code, err, "truncated")


def test_foreign_file(tmp_path, capsys):
    (tmp_path / "notes.safetensors").write_bytes(b"certainly not a checkpoint")
    code, _, err = run(capsys, tmp_path / "notes.safetensors", tmp_path / "out")
    _assert_failed_cleanly(tmp_path, code, err, "not a safetensors file")


def test_unknown_layout(tmp_path, capsys):
    import numpy as np

    src = _copy_fixture(tmp_path, {"encoder.weight": np.zeros((4, 4), np.float32)})
    code, _, err = run(capsys, src, tmp_path / "out")
    _assert_failed_cleanly(tmp_path, code, err, "not a MoshiVis checkpoint")


def test_missing_tensor(tmp_path, capsys):
    tensors = _bf16_tensors()
    del tensors["llm.text_linear.weight"]
    from safetensors.torch import save_file as torch_save

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(FIXTURE_A / "config.json", src)
    torch_save(tensors, str(src / "model.safetensors"))
    code, _, err = run(capsys, src, tmp_path / "out")
    _assert_failed_cleanly(tmp_path, code, err, "missing 1 tensor(s)", "llm.text_linear.weight")


def test_wrong_shape(tmp_path, capsys):
    tensors = _bf16_tensors()
    tensors["llm.transformer.layers.1.gating.linear_out.weight"] = tensors[
        "llm.transformer.layers.1.gating.linear_out.weight"
    ][:, :64].contiguous()
    from safetensors.torch import save_file as torch_save

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(FIXTURE_A / "config.json", src)
    torch_save(tensors, str(src / "model.safetensors"))
    code, _, err = run(capsys, src, tmp_path / "out", "--bits", 4)
    _assert_failed_cleanly(tmp_path, code, err, "wrong shape", "transformer.layers.1.gating.linear_out.weight")


def test_existing_output_is_kept_without_force(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, _, err = run(capsys, FIXTURE_A, out)
    assert code == EXIT_ERROR and "--force" in err
    assert leftovers(out) == ["precious.txt"]
    code, _, err = run(capsys, FIXTURE_A, out, "--force")
    assert code == 0, err
    assert leftovers(out) == ["config.json", "model.safetensors"]


def _fail_after(monkeypatch, calls: int, exc: BaseException) -> None:
    """Make the safetensors writer fail on its `calls`-th tensor."""
    real = checkpoint._write_array
    count = [0]

    def failing(f, a):
        count[0] += 1
        if count[0] == calls:
            raise exc
        real(f, a)

    monkeypatch.setattr(checkpoint, "_write_array", failing)


def test_disk_full_midway_leaves_nothing(tmp_path, capsys, monkeypatch):
    _fail_after(monkeypatch, 100, OSError(errno.ENOSPC, "No space left on device"))
    code, _, err = run(capsys, FIXTURE_A, tmp_path / "out", "--bits", 4)
    _assert_failed_cleanly(tmp_path, code, err, "No space left on device", "disk full")


def test_failure_with_force_keeps_the_old_output(tmp_path, capsys, monkeypatch):
    assert run(capsys, FIXTURE_A, tmp_path / "out")[0] == 0
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    _fail_after(monkeypatch, 100, OSError(errno.EIO, "Input/output error"))
    code, _, err = run(capsys, FIXTURE_A, tmp_path / "out", "--bits", 4, "--force")
    assert code == EXIT_ERROR and "Input/output error" in err
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
    assert not [n for n in leftovers(tmp_path) if n.startswith(".")]


def test_interrupt_midway_leaves_nothing(tmp_path, capsys, monkeypatch):
    _fail_after(monkeypatch, 50, KeyboardInterrupt())
    code, _, err = run(capsys, FIXTURE_A, tmp_path / "out")
    assert code == EXIT_INTERRUPTED and "interrupted" in err
    assert leftovers(tmp_path) == []


def test_bad_options(tmp_path, capsys):
    code, _, err = run(capsys, FIXTURE_A, tmp_path / "out", "--group-size", 32)
    assert code == EXIT_ERROR and "need --bits" in err
    code, _, err = run(capsys, FIXTURE_A, tmp_path / "out", "--bits", 4, "--policy", "uniform", "--sensitive-bits", 8)
    assert code == EXIT_ERROR and "mixed policy" in err
    with pytest.raises(SystemExit):
        main([str(FIXTURE_A), str(tmp_path / "out"), "--bits", "7"])
    assert leftovers(tmp_path) == []


def test_python_dash_m_convert_runs():
    done = subprocess.run([sys.executable, "-m", "convert", "--help"], capture_output=True, text=True,
                          cwd=Path(__file__).parents[1])
    assert done.returncode == 0 and "--bits" in done.stdout


def test_api_progress_callbacks(tmp_path):
    seen = []
    result = convert_checkpoint(FIXTURE_A, tmp_path / "out", on_start=seen.append,
                                on_tensor=lambda name, n: seen.append(n))
    assert seen[0] == sum(seen[1:]) and len(seen) - 1 == result.num_tensors
    assert result.file_bytes == (tmp_path / "out" / "model.safetensors").stat().st_size
