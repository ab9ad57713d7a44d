"""Optimized BLAS: found, loaded before MLX, opt-out honoured, same numbers."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moshivis_mlx import blas

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="MLX's Linux wheel only")

PROBE = (
    "import json, sys; from moshivis_mlx.blas import use_optimized_blas; s = use_optimized_blas(); "
    "import mlx.core as mx, numpy as np; a = mx.random.normal((64, 96), key=mx.random.key(0)); "
    "b = mx.random.normal((96, 32), key=mx.random.key(1)); "
    "print(json.dumps({'optimized': s.optimized, 'note': s.note, 'product': np.array(a @ b).tolist()}))"
)


def probe(env_extra: dict[str, str] | None = None) -> dict:
    import json
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", blas.OPT_OUT_VARIABLE)}
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout)


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
        "from moshivis_mlx.blas import use_optimized_blas; print(use_optimized_blas().note)"
    )
    import os

    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert "mlx was imported before use_optimized_blas()" in out.stdout


def test_ld_preload_is_recognised(library):
    env_preload = str(library.parent / "libblas.so.3") if (library.parent / "libblas.so.3").exists() else str(library)
    result = probe({"LD_PRELOAD": env_preload})
    assert result["optimized"], result["note"]


def blis_library():
    return next((p for p in blas.candidate_paths() if "blis" in p.name and p.is_absolute() and p.exists()), None)


@pytest.mark.skipif(blis_library() is None, reason="no BLIS on this machine (.ci/run installs libblis4-pthread)")
def test_blis_is_recognised_and_agrees_with_the_bundled_one():
    import numpy as np

    fast = probe({"LD_PRELOAD": str(blis_library())})
    slow = probe({blas.OPT_OUT_VARIABLE: "bundled"})
    assert fast["optimized"] and "blis" in fast["note"], fast["note"]
    np.testing.assert_allclose(fast["product"], slow["product"], rtol=1e-5, atol=1e-5)
