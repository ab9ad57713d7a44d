"""`python -m moshivis_mlx doctor`: what this machine will do, on one screen.

Written to be pasted into a bug report: versions, the device and code path
MLX will take, memory and the weights the CLI would pick (and which are in the
Hugging Face cache), BLAS and allocator, audio devices, the echo canceller's
backend and the web page's files. Every problem comes with the command that
fixes it. It reads the cache without any network access and opens no audio
stream, so it takes a second or two.

The exit status is 1 only when nothing can run (MLX, Mimi's codec or the text
tokenizer's library is missing); a problem that blocks one mode, or only slows
things down, is reported and the status stays 0.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

FILE_MODE, LIVE_MODE, WEB_PAGE = "file mode", "live mode", "web page"
EVERY_MODE = frozenset({FILE_MODE, LIVE_MODE, WEB_PAGE})
DISTRIBUTIONS = ("mlx", "mlx-lm", "moshivis_mlx", "rustymimi", "sentencepiece", "huggingface_hub", "numpy",
                 "sounddevice", "livekit", "aiohttp")
STATIC_FILES = ("index.html", "app.js", "audio-worklet.js", "style.css")  # what index.html loads
_GIB = 2**30
_BF16 = 16
_SETTINGS = ("MOSHIVIS_MLX_BLAS", "MOSHIVIS_MLX_MALLOC", "MOSHIVIS_MLX_CPU_STREAMS", "HF_HOME", "HF_HUB_CACHE",
             "HF_HUB_OFFLINE")  # never tokens: the output is pasted in public

DESCRIPTION = """\
Print what this machine will do with moshivis_mlx: versions, MLX's device and
code path, memory and weights, audio devices, echo cancellation, the web page.
Offline and quick; paste its output into bug reports. Exit status 1 only when
no mode can run.
"""


@dataclass(frozen=True)
class Problem:
    """Something wrong, what it stops (no modes: it only slows things down) and its fix."""

    what: str
    fix: str
    blocks: frozenset[str] = frozenset()
    fatal: bool = False  # nothing can run: the exit status becomes 1


@dataclass
class Report:
    sections: list[tuple[str, list[tuple[str, str]]]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def section(self, title: str) -> list[tuple[str, str]]:
        """A new titled list of (name, value) rows."""
        rows: list[tuple[str, str]] = []
        self.sections.append((title, rows))
        return rows

    @property
    def fatal(self) -> bool:
        return any(p.fatal for p in self.problems)

    def render(self) -> str:
        width = max((len(name) for _, rows in self.sections for name, _ in rows), default=0)
        lines = ["moshivis_mlx doctor"]
        for title, rows in self.sections:
            lines += ["", title, *(f"  {name.ljust(width)}  {value}" for name, value in rows)]
        lines += ["", *self._problem_lines(), "", self.summary()]
        return "\n".join(lines)

    def _problem_lines(self) -> list[str]:
        if not self.problems:
            return ["no problems found"]
        lines = [f"problems ({len(self.problems)})"]
        for p in self.problems:
            blocks = "every mode" if p.fatal else ", ".join(sorted(p.blocks)) or "nothing (slower)"
            lines += [f"  ! {p.what}", f"    blocks: {blocks}", f"    fix:    {p.fix}"]
        return lines

    def summary(self) -> str:
        """One line per mode: can it run?"""
        if self.fatal:
            return "result: no mode can run until the problems above that block every mode are fixed"
        blocked = set().union(*(p.blocks for p in self.problems)) if self.problems else set()
        states = [f"{mode} {'blocked' if mode in blocked else 'ready'}" for mode in (FILE_MODE, LIVE_MODE, WEB_PAGE)]
        return "result: " + ", ".join(states)


# -- versions ----------------------------------------------------------------------


def distribution_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def add_versions(report: Report) -> None:
    rows = report.section("versions")
    rows.append(("Python", f"{platform.python_version()} ({sys.executable})"))
    rows.append(("system", f"{platform.platform()} {platform.machine()}"))
    here = Path(__file__).resolve().parents[1]  # moshivis_mlx/, this file being in moshivis_mlx/app/
    for name in DISTRIBUTIONS:
        suffix = f" ({here})" if name == "moshivis_mlx" else ""
        rows.append((name, distribution_version(name) + suffix))
    settings = [f"{name}={os.environ[name]}" for name in _SETTINGS if name in os.environ]
    rows.append(("settings", " ".join(settings) or f"none of {', '.join(_SETTINGS)}"))


# -- what every mode needs ---------------------------------------------------------


def try_import(module: str) -> str | None:
    """None when `module` imports, else why not (one line)."""
    try:
        importlib.import_module(module)
    except Exception as e:  # a broken install can raise anything at import (OSError for a missing library...)
        text = str(e).strip()
        return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
    return None


def mlx_fix() -> str:
    if sys.platform == "darwin" and platform.machine() != "arm64":
        return ("MLX runs on Apple Silicon only, with a native arm64 Python (this one is "
                f"{platform.machine()}): install Python for arm64, then pip install mlx")
    return "pip install 'mlx[cpu]'" if sys.platform == "linux" else "pip install mlx"


def check_essentials(report: Report) -> bool:
    """MLX, Mimi's codec and the tokenizer library: without any of them nothing runs. True if MLX imports."""
    needs = (
        ("mlx.core", "MLX", mlx_fix()),
        ("rustymimi", "rustymimi (Mimi, the audio codec)", "pip install rustymimi"),
        ("sentencepiece", "sentencepiece (the text tokenizer)", "pip install sentencepiece"),
    )
    for module, what, fix in needs:
        error = try_import(module)
        if error is not None:
            report.problems.append(Problem(f"{what} cannot be imported ({error})", fix, EVERY_MODE, fatal=True))
    if importlib.util.find_spec("mlx_lm") is None:  # found, not imported: its __init__ pulls in transformers
        report.problems.append(Problem("mlx-lm (token sampling) is not installed", "pip install mlx-lm",
                                       EVERY_MODE, fatal=True))
    return "mlx.core" in sys.modules


# -- compute -----------------------------------------------------------------------


def add_compute(report: Report, mlx_ok: bool) -> None:
    """The device, the dtypes `dtype="auto"` picks, the BLAS, the CPU streams and the allocator."""
    rows = report.section("compute")
    if mlx_ok:
        add_device(rows)
    else:
        rows.append(("device", "unknown: MLX cannot be imported"))
    if sys.platform == "linux":
        add_blas(report, rows)
        add_allocator(report, rows)


def add_device(rows: list[tuple[str, str]]) -> None:
    import mlx.core as mx

    from ..cpu.cores import requested_streams
    from ..weights.loading import AUTO_DTYPE, float32_parts_dtype, resolve_dtype

    from ..cpu.platform_path import choose_platform_path

    device = mx.default_device()
    rows.append(("device", f"{device.type.name} ({describe_device(_device_info(mx))})"))
    rows.append(("code path", choose_platform_path().describe()))
    rows.append(("quantized", f"weights computed in {resolve_dtype(AUTO_DTYPE, quantized=True)} (--dtype auto)"))
    parts = float32_parts_dtype(AUTO_DTYPE, quantized=False)
    bf16 = "bfloat16" + (f", depformer and cross-attention in {parts}" if parts else " throughout")
    rows.append(("bf16 weights", f"computed in {bf16} (--dtype auto)"))
    if device == mx.cpu:
        rows.append(("CPU streams", f"{requested_streams()} (large products spread over cores)"))


def _device_info(mx) -> dict:
    """MLX's description of the default device; older MLX has none."""
    try:
        return dict(mx.device_info())
    except (AttributeError, RuntimeError, TypeError):
        return {}


def describe_device(info: dict) -> str:
    """Name and architecture, and on a Mac the GPU's working-set limit, which the weights must fit in."""
    parts = [str(info[key]) for key in ("device_name", "architecture") if info.get(key)]
    limit = info.get("max_recommended_working_set_size")
    if isinstance(limit, (int, float)) and limit > 0:
        parts.append(f"working set up to {limit / _GIB:.1f} GiB")
    return ", ".join(parts) or "no details from MLX"


def add_blas(report: Report, rows: list[tuple[str, str]]) -> None:
    from ..cpu import blas

    state = blas.status()
    if not state.optimized:
        rows.append(("BLAS", "MLX's bundled reference BLAS (slow float32 matmuls)"))
        report.problems.append(Problem("no optimized BLAS: pictures take minutes to embed, steps are slower",
                                       "sudo apt-get install libopenblas0-pthread (Debian/Ubuntu)"))
        return
    core = blas.openblas_core()
    kernel = ""
    if core is not None:
        kernel = f"; core {core}, small-matrix kernel {'used' if blas.has_small_matrix_kernel(core) else 'absent'}"
    rows.append(("BLAS", f"{state.library}{kernel}"))


def add_allocator(report: Report, rows: list[tuple[str, str]]) -> None:
    from ..cpu import malloc

    rows.append(("allocator", malloc.status().split("; ")[0]))
    opted_out = os.environ.get(malloc.OPT_OUT_VARIABLE, "").lower() == "system"
    if not malloc.jemalloc_loaded() and malloc.find_jemalloc() is None and not opted_out:
        report.problems.append(Problem("jemalloc is not installed: steps on a CPU are ~25% slower with glibc's malloc",
                                       "sudo apt-get install libjemalloc2 (Debian/Ubuntu)"))


# -- memory and weights ------------------------------------------------------------


def add_weights(report: Report) -> None:
    """The weights the CLI picks for this memory, and which of the repository's files are cached."""
    from ..weights.hub import (DEFAULT_REPO, EIGHT_BIT_MIN_BANDWIDTH_GBPS, LARGE_MEMORY_BYTES, MIMI_FILE,
                               MODEL_FILES, TOKENIZER_FILE, apple_chip, chip_bandwidth_gbps, default_bits,
                               total_memory_bytes)

    rows = report.section("memory and weights")
    memory, chip = total_memory_bytes(), apple_chip()
    bits = default_bits(memory, chip)
    rows.append(("memory", "unknown" if memory is None else f"{memory / _GIB:.1f} GiB"))
    if chip is not None:
        bandwidth = chip_bandwidth_gbps(chip)
        rows.append(("chip", f"Apple {chip}, " + (f"{bandwidth:g} GB/s" if bandwidth else "bandwidth not known")))
    rule = (f"8-bit from {LARGE_MEMORY_BYTES / _GIB:g} GiB of memory on a chip reading at least "
            f"{EIGHT_BIT_MIN_BANDWIDTH_GBPS} GB/s, else 4-bit; -q 4, -q 8 or --bf16 choose")
    rows.append(("default weights", f"{bits}-bit, {MODEL_FILES[bits]} from {DEFAULT_REPO} ({rule})"))
    cache = hub_cache()
    if cache is None:
        rows.append(("HF cache", "huggingface_hub is not installed"))
        report.problems.append(Problem("huggingface_hub is not installed: the Hub's weights cannot be fetched",
                                       "pip install huggingface_hub (or pass --model, --mimi and --tokenizer)",
                                       EVERY_MODE))
        return
    directory, offline, lookup = cache
    rows.append(("HF cache", f"{directory}{' (offline: HF_HUB_OFFLINE)' if offline else ''}"))
    roles = {**{MODEL_FILES[b]: "bf16 model" if b == _BF16 else f"{b}-bit model" for b in sorted(MODEL_FILES)},
             MIMI_FILE: "Mimi", TOKENIZER_FILE: "tokenizer"}
    cached = {name: lookup(DEFAULT_REPO, name) for name in roles}
    for name, role in roles.items():
        rows.append((role, f"{name}: {describe_cached(cached[name])}"))
    needed = [MODEL_FILES[bits], MIMI_FILE, TOKENIZER_FILE]
    missing = [name for name in needed if cached[name] is None]
    if missing and offline:
        report.problems.append(Problem(
            f"offline, and the default weights are not all cached (missing: {', '.join(missing)})",
            f"with network access: hf download {DEFAULT_REPO} {' '.join(missing)} "
            "(or pass local files with --model, --mimi and --tokenizer)",
            EVERY_MODE))
    elif missing:
        rows.append(("first run", f"downloads {', '.join(missing)}"))


def hub_cache() -> tuple[str, bool, Callable[[str, str], Path | None]] | None:
    """(cache directory, offline?, lookup(repo, filename) -> Path | None), or None without huggingface_hub.

    The lookup reads the cache only: it never touches the network.
    """
    try:
        from huggingface_hub import constants, try_to_load_from_cache
    except ImportError:
        return None

    def lookup(repo: str, filename: str) -> Path | None:
        found = try_to_load_from_cache(repo, filename)
        return Path(found) if isinstance(found, str) and Path(found).is_file() else None

    return constants.HF_HUB_CACHE, bool(constants.HF_HUB_OFFLINE), lookup


def describe_cached(path: Path | None) -> str:
    if path is None:
        return "not in the cache"
    size = path.stat().st_size
    return f"in the cache ({size / _GIB:.1f} GiB)" if size >= _GIB / 10 else "in the cache"


# -- audio -------------------------------------------------------------------------


def portaudio_fix() -> str:
    if sys.platform == "darwin":
        return "pip install --force-reinstall sounddevice (its macOS wheel includes PortAudio)"
    if sys.platform == "win32":
        return "pip install --force-reinstall sounddevice (its Windows wheel includes PortAudio)"
    return ("sudo apt-get install libportaudio2 (Debian/Ubuntu), sudo dnf install portaudio (Fedora), "
            "sudo pacman -S portaudio (Arch)")


def add_audio(report: Report) -> None:
    """PortAudio and the devices live mode would open by default."""
    from ..audio.devices import AudioDeviceError, import_sounddevice

    rows = report.section("audio (live mode)")
    try:
        sd = import_sounddevice()
    except AudioDeviceError as e:
        rows.append(("PortAudio", "not available"))
        sounddevice_missing = importlib.util.find_spec("sounddevice") is None
        fix = "pip install sounddevice" if sounddevice_missing else portaudio_fix()
        report.problems.append(Problem(str(e).split(". ")[0], fix, frozenset({LIVE_MODE})))
        return
    rows.append(("PortAudio", sd.get_portaudio_version()[1]))
    for kind in ("input", "output"):
        add_default_device(report, rows, sd, kind)


def add_default_device(report: Report, rows: list[tuple[str, str]], sd, kind: str) -> None:
    from ..audio.devices import AudioDeviceError, find_device

    try:
        index = find_device(sd, None, kind)
        device = sd.query_devices(index)
    except (AudioDeviceError, sd.PortAudioError) as e:
        rows.append((kind, "none"))
        fix = f"python -m moshivis_mlx --list-devices shows what PortAudio sees; choose one with --{kind}-device"
        report.problems.append(Problem(str(e), fix, frozenset({LIVE_MODE})))
        return
    channels = device[f"max_{kind}_channels"]
    rows.append((kind, f"#{index} {device['name']}: {device['default_samplerate']:g} Hz, {channels} channels"))


def add_echo(report: Report) -> None:
    from ..audio.echo import EchoCanceller

    rows = report.section("echo cancellation")
    try:
        backend = EchoCanceller().backend
    except ImportError as e:
        rows.append(("backend", "none"))
        report.problems.append(Problem(f"no echo canceller ({e.__cause__ or e}): use headphones, or the model "
                                       "hears itself from the loudspeakers",
                                       "pip install livekit"))
        return
    rows.append(("backend", backend))


# -- the web page ------------------------------------------------------------------


def static_directory() -> Path:
    """Where the web page's files are installed (found without importing aiohttp)."""
    return Path(__file__).resolve().parent / "web" / "static"


def add_web(report: Report) -> None:
    rows = report.section("web page")
    aiohttp = try_import("aiohttp")
    rows.append(("aiohttp", "importable" if aiohttp is None else aiohttp))
    if aiohttp is not None:
        report.problems.append(Problem(f"aiohttp cannot be imported ({aiohttp})", "pip install aiohttp",
                                       frozenset({WEB_PAGE})))
    static = static_directory()
    missing = [name for name in STATIC_FILES if not (static / name).is_file()]
    rows.append(("static files", f"{static}: " + (f"missing {', '.join(missing)}" if missing else "all present")))
    if missing:
        report.problems.append(Problem(f"the web page's files are missing from {static}: {', '.join(missing)}",
                                       "reinstall moshivis_mlx (pip install --force-reinstall moshivis_mlx, "
                                       "or pip install -e . in a checkout)", frozenset({WEB_PAGE})))


# -- entry point -------------------------------------------------------------------


def diagnose() -> Report:
    """Every check, in the order printed. MLX is imported after the BLAS is chosen, as the CLI does."""
    from ..cpu.blas import use_optimized_blas

    use_optimized_blas()
    report = Report()
    add_versions(report)
    mlx_ok = check_essentials(report)
    add_compute(report, mlx_ok)
    add_weights(report)
    add_audio(report)
    add_echo(report)
    add_web(report)
    return report


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m moshivis_mlx doctor", description=DESCRIPTION).parse_args(argv)
    report = diagnose()
    print(report.render())
    return 1 if report.fatal else 0
