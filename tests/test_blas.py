"""Optimized BLAS: found, loaded before MLX, opt-out honoured, same numbers."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moshivis_mlx.cpu import blas

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="MLX's Linux wheel only")

PROBE = (
    "import json, sys; from moshivis_mlx.cpu.blas import use_optimized_blas; s = use_optimized_blas(); "
    "import mlx.core as mx, numpy as np; a = mx.random.normal((64, 96), key=mx.random.key(0)); "
    "b = mx.random.normal((96, 32), key=mx.random.key(1)); "
    "print(json.dumps({'optimized': s.optimized, 'library': s.library, 'note': s.note, "
    "'product': np.array(a @ b).tolist()}))"
)


def probe(env_extra: dict[str, str] | None = None, code: str = PROBE) -> dict:
    import json

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(env_extra))
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    result["stderr"] = out.stderr
    return result


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", blas.OPT_OUT_VARIABLE)}
    env.update(extra or {})
    return env


@pytest.fixture(scope="module")
def library():
    path = blas.find_optimized_blas()
    if path is None:
        pytest.skip("no OpenBLAS on this machine (.ci/run installs libopenblas0-pthread)")
    return path


def test_optimized_blas_is_used_and_agrees_with_the_bundled_one(library):
    import numpy as np

    fast = probe()
    slow = probe({blas.OPT_OUT_VARIABLE: "bundled"})
    assert fast["optimized"] and "optimized BLAS in use" in fast["note"]
    assert not slow["optimized"] and "apt-get install libopenblas0-pthread" in slow["note"]
    np.testing.assert_allclose(fast["product"], slow["product"], rtol=1e-5, atol=1e-5)


def test_too_late_after_mlx_is_imported_says_so(library):
    code = (
        "import os; os.environ.pop('LD_PRELOAD', None); import mlx.core; "
        "from moshivis_mlx.cpu.blas import use_optimized_blas; print(use_optimized_blas().note)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(), check=True)
    assert "mlx was imported before use_optimized_blas()" in out.stdout


def test_ld_preload_is_recognised(library):
    env_preload = str(library.parent / "libblas.so.3") if (library.parent / "libblas.so.3").exists() else str(library)
    result = probe({"LD_PRELOAD": env_preload})
    assert result["optimized"], result["note"]


def blis_library():
    return blas.installed("blis")


@pytest.mark.skipif(blis_library() is None, reason="no BLIS on this machine (.ci/run installs libblis4-pthread)")
def test_blis_is_recognised_and_agrees_with_the_bundled_one():
    import numpy as np

    fast = probe({"LD_PRELOAD": str(blis_library())})
    slow = probe({blas.OPT_OUT_VARIABLE: "bundled"})
    assert fast["optimized"] and "blis" in fast["note"], fast["note"]
    np.testing.assert_allclose(fast["product"], slow["product"], rtol=1e-5, atol=1e-5)


# -- which library: OpenBLAS where its small-matrix kernel exists, else BLIS --------

both_installed = pytest.mark.skipif(
    blas.installed("openblas") is None or blas.installed("blis") is None,
    reason="needs OpenBLAS and BLIS (.ci/run installs both)",
)


@both_installed
def test_automatic_choice_follows_the_openblas_core():
    """One-row products (every Linear of a step) are fast through OpenBLAS only on cores
    with its small-matrix kernel; elsewhere BLIS is used (2.4x faster depformer on AMD Zen)."""
    core = blas.private_openblas_core(blas.installed("openblas"))
    assert core, "OpenBLAS reports no core name"
    expected = "openblas" if blas.has_small_matrix_kernel(core) else "blis"
    result = probe()
    assert result["optimized"] and expected in result["library"], (core, result["note"])


@both_installed
@pytest.mark.parametrize("wanted", ["openblas", "blis"])
def test_a_library_can_be_forced(wanted):
    import numpy as np

    result = probe({blas.OPT_OUT_VARIABLE: wanted.upper()})
    assert result["optimized"] and wanted in result["library"], result["note"]
    reference = probe({blas.OPT_OUT_VARIABLE: "bundled"})
    np.testing.assert_allclose(result["product"], reference["product"], rtol=1e-5, atol=1e-5)


def test_an_unknown_choice_is_reported_and_ignored(library):
    result = probe({blas.OPT_OUT_VARIABLE: "mkl-please"})
    assert "ignoring MOSHIVIS_MLX_BLAS='mkl-please'" in result["stderr"]
    assert result["optimized"], result["note"]


@pytest.mark.skipif(blas.installed("openblas") is None, reason="no OpenBLAS on this machine")
def test_reading_the_openblas_core_binds_nothing_for_mlx():
    """The core is read from a private load: MLX must not bind to the library that was only asked."""
    code = (
        "import json; from moshivis_mlx.cpu import blas; "
        "core = blas.private_openblas_core(blas.installed('openblas')); "
        "print(json.dumps({'core': core, 'provider': blas.global_cblas_provider()}))"
    )
    result = probe(code=code)
    assert result["core"] and result["provider"] is None, result


def test_key_blocks_are_equal_and_small_enough_for_the_small_kernel(monkeypatch):
    monkeypatch.setattr(blas, "openblas_core", lambda: "SkylakeX")
    assert [blas.key_blocks(64, n) for n in (256, 1024, 1200, 2048, 3000)] == [1, 1, 1, 2, 3]
    assert blas.key_blocks(64, 2053) == 1  # a prime: no equal blocks, no split
    assert blas.key_blocks(1024, 3000) == 4  # 1000 keys x 1024 would pass 10^6 multiply-adds; 750 do not
    monkeypatch.setattr(blas, "openblas_core", lambda: "Haswell")  # no small-matrix kernel to stay on
    assert blas.key_blocks(64, 3000) == 1
