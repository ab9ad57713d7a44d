"""The README stays short and says only what exists: every flag it names is in some command's --help."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_LINES = 300
COMMANDS = ([], ["web"], ["convert"])  # python -m moshivis_mlx [COMMAND] --help
NOT_OURS = {"--force-reinstall"}  # pip's, in an install hint


def help_texts() -> str:
    texts = []
    for command in COMMANDS:
        out = subprocess.run([sys.executable, "-m", "moshivis_mlx", *command, "--help"], capture_output=True,
                             text=True, cwd=ROOT, timeout=120)
        assert out.returncode == 0, out.stderr
        texts.append(out.stdout)
    return "\n".join(texts)


def test_the_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines <= MAX_LINES, f"README.md has {lines} lines; keep it under {MAX_LINES} (history: benchmarks/README.md)"


def test_every_flag_in_the_readme_exists():
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", README.read_text())) - NOT_OURS
    assert len(named) > 20  # the pattern finds them
    helps = help_texts()
    missing = sorted(flag for flag in named if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helps))
    assert not missing, f"README.md names flags no command has: {missing}"


def test_every_subcommand_in_the_readme_exists():
    named = set(re.findall(r"python -m moshivis_mlx (\w+)", README.read_text()))
    assert {"web", "convert", "doctor"} <= named
    for command in named:
        out = subprocess.run([sys.executable, "-m", "moshivis_mlx", command, "--help"], capture_output=True,
                             text=True, cwd=ROOT, timeout=120)
        assert out.returncode == 0, f"python -m moshivis_mlx {command} --help: {out.stderr[-500:]}"
