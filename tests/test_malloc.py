"""jemalloc: a program restarts once with it, keeps its arguments, honours the opt-out."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from moshivis_mlx.cpu import malloc

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc only")

PROBE = (
    "import json, sys; from moshivis_mlx.cpu import malloc; print('started', flush=True); "
    "malloc.restart_with_jemalloc(); "
    "print(json.dumps({'loaded': malloc.jemalloc_loaded(), 'argv': sys.argv[1:], 'status': malloc.status()}))"
)


def run_probe(env_extra: dict[str, str] | None = None) -> tuple[int, dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", malloc.OPT_OUT_VARIABLE)}
    env.pop("MOSHIVIS_MLX_MALLOC_RESTARTED", None)
    env.update(env_extra or {})
    out = subprocess.run(
        [sys.executable, "-c", PROBE, "--image", "a b.jpg"], capture_output=True, text=True, env=env, check=True
    )
    lines = out.stdout.splitlines()
    return lines.count("started"), json.loads(lines[-1])


@pytest.fixture(scope="module")
def jemalloc():
    path = malloc.find_jemalloc()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(".ci/run installs libjemalloc2: it should be found")
        pytest.skip("no jemalloc on this machine (Debian: libjemalloc2)")
    return path


def test_a_program_restarts_once_with_jemalloc_and_the_same_arguments(jemalloc):
    starts, result = run_probe()
    assert starts == 2  # the first start, then the restarted one, which does not restart again
    assert result["loaded"] and result["status"] == "jemalloc in use"
    assert result["argv"] == ["--image", "a b.jpg"]


def test_opting_out_keeps_glibc_malloc(jemalloc):
    starts, result = run_probe({malloc.OPT_OUT_VARIABLE: "system"})
    assert starts == 1 and not result["loaded"]
    assert "MOSHIVIS_MLX_MALLOC=system" in result["status"]


def test_already_preloaded_means_no_restart(jemalloc):
    starts, result = run_probe({"LD_PRELOAD": str(jemalloc)})
    assert starts == 1 and result["loaded"]


def test_without_jemalloc_nothing_happens_and_the_status_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(malloc, "find_jemalloc", lambda: None)
    monkeypatch.setattr(malloc, "jemalloc_loaded", lambda: False)
    monkeypatch.delenv(malloc.OPT_OUT_VARIABLE, raising=False)
    malloc.restart_with_jemalloc()  # returns: this test process goes on
    assert "apt-get install libjemalloc2" in malloc.status()
