"""Finding the weights, Mimi and the text tokenizer: local files or the Hugging Face Hub.

Downloads go through `huggingface_hub` (its cache, its progress bars, its
`HF_HUB_OFFLINE` and `HF_TOKEN`). What cannot be found is reported in one
message that names every missing file and the ways to provide it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_REPO = "kyutai/moshika-vis-mlx"
MODEL_FILES = {4: "model.q4.safetensors", 8: "model.q8.safetensors", 16: "model.safetensors"}
BF16 = 16  # "bits" of the unquantized file
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
TOKENIZER_FILE = "tokenizer_spm_32k_3.model"
LARGE_MEMORY_BYTES = 24 * 2**30  # from here on the 8-bit model (10.4 GB) is the default...
# ...if the chip reads its step fast enough: the 8-bit model reads 10.24 GB per step with the
# image on and a full window (benchmarks/bench_bytes.py); at 171 GB/s that is 60 ms, 3/4 of an
# 80 ms frame. Slower chips get the 4-bit model (5.96-6.09 GB), which keeps up on all of them.
EIGHT_BIT_MIN_BANDWIDTH_GBPS = 171
# Unified memory bandwidth of each Apple Silicon chip, GB/s, as Apple announced it (the lower
# figure where a chip came in two; M1's is its LPDDR4X-4266 x 128-bit bus). README: "Speed on a Mac".
APPLE_BANDWIDTH_GBPS = {
    "M1": 68.25, "M1 Pro": 200, "M1 Max": 400, "M1 Ultra": 800,
    "M2": 100, "M2 Pro": 200, "M2 Max": 400, "M2 Ultra": 800,
    "M3": 100, "M3 Pro": 150, "M3 Max": 300, "M3 Ultra": 819,
    "M4": 120, "M4 Pro": 273, "M4 Max": 410,
}
_GIB = 2**30


class MissingFilesError(RuntimeError):
    """Files that are neither given locally nor obtainable from the Hub."""


@dataclass(frozen=True)
class ResolvedFiles:
    model: Path
    mimi: Path
    tokenizer: Path
    bits: int | None  # 4, 8, 16 (bf16) for Hub files; None for a local --model


def total_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def apple_chip() -> str | None:
    """'M2 Pro' on an Apple Silicon Mac, else None."""
    if sys.platform != "darwin":
        return None
    try:
        brand = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                               timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return brand.removeprefix("Apple ").strip() or None


def chip_bandwidth_gbps(chip: str | None) -> float | None:
    return APPLE_BANDWIDTH_GBPS.get(chip) if chip else None


def default_bits(memory_bytes: int | None = None, chip: str | None = "this Mac's") -> int:
    """8-bit with at least 24 GB of memory on a chip whose bandwidth keeps its step within
    3/4 of a frame, else 4-bit (audibly worse, but real time on every Apple Silicon chip).
    A chip not in `APPLE_BANDWIDTH_GBPS` (newer ones) is judged by its memory alone."""
    memory = total_memory_bytes() if memory_bytes is None else memory_bytes
    if memory is None or memory < LARGE_MEMORY_BYTES:
        return 4
    bandwidth = chip_bandwidth_gbps(apple_chip() if chip == "this Mac's" else chip)
    return 4 if bandwidth is not None and bandwidth < EIGHT_BIT_MIN_BANDWIDTH_GBPS else 8


def resolve_files(
    *,
    model: str | Path | None = None,
    mimi: str | Path | None = None,
    tokenizer: str | Path | None = None,
    bits: int | None = None,
    repo: str = DEFAULT_REPO,
) -> ResolvedFiles:
    """Local paths where given, Hub files (downloaded or cached) for the rest."""
    if bits is not None and bits not in MODEL_FILES:
        raise ValueError(f"bits must be one of {sorted(MODEL_FILES)}, got {bits}")
    wanted: dict[str, str] = {}
    if model is None:
        bits = bits or default_bits()
        wanted["model"] = MODEL_FILES[bits]
    if mimi is None:
        wanted["mimi"] = MIMI_FILE
    if tokenizer is None:
        wanted["tokenizer"] = TOKENIZER_FILE
    found = _download(repo, wanted) if wanted else {}
    return ResolvedFiles(
        model=Path(model).expanduser() if model is not None else found["model"],
        mimi=Path(mimi).expanduser() if mimi is not None else found["mimi"],
        tokenizer=Path(tokenizer).expanduser() if tokenizer is not None else found["tokenizer"],
        bits=None if model is not None else bits,
    )


_FLAGS = {"model": "--model PATH", "mimi": "--mimi PATH", "tokenizer": "--tokenizer PATH"}


def _download(repo: str, wanted: dict[str, str]) -> dict[str, Path]:
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )
    except ImportError as e:
        raise MissingFilesError(
            f"`huggingface_hub` is needed to fetch {', '.join(wanted.values())} ({e}); install it "
            "(pip install huggingface_hub) or pass local files with --model, --mimi and --tokenizer"
        ) from None
    found: dict[str, Path] = {}
    missing: list[str] = []
    cache_only = False  # after one failed lookup, do not wait for the network again
    for role, filename in wanted.items():
        try:
            found[role] = Path(hf_hub_download(repo, filename, local_files_only=cache_only))
        except LocalEntryNotFoundError:  # offline (or no network) and not in the cache
            missing.append(role)
            cache_only = True
        except (RepositoryNotFoundError, GatedRepoError) as e:
            raise MissingFilesError(f"cannot use the Hugging Face repository {repo!r}: {_first_line(e)}") from None
        except EntryNotFoundError:
            raise MissingFilesError(f"the Hugging Face repository {repo!r} has no file {filename!r}") from None
        except (HfHubHTTPError, OSError) as e:
            raise MissingFilesError(f"downloading {filename} from {repo} failed: {_first_line(e)}") from None
    if missing:
        raise MissingFilesError(_missing_message(repo, {role: wanted[role] for role in missing}))
    return found


def _missing_message(repo: str, missing: dict[str, str]) -> str:
    from huggingface_hub import constants

    offline = "offline mode is on (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
    lines = [
        f"{offline} and these files of {repo} are not in the Hugging Face cache ({constants.HF_HUB_CACHE}):",
        *(f"  {name}" for name in missing.values()),
        "Provide them in one of these ways:",
        "  - run once with network access (and without HF_HUB_OFFLINE=1): they are downloaded and cached;",
        f"  - download them elsewhere: hf download {repo} {' '.join(missing.values())};",
        f"  - pass local files: {', '.join(_FLAGS[role] for role in missing)}.",
    ]
    return "\n".join(lines)


def load_model(path: str | Path, *, dtype: str = "auto", kv_bits="auto", image_kv_bits="auto"):
    """`moshivis_mlx.load` for a resolved checkpoint: the one place the CLI and
    `Conversation.from_pretrained` load weights. A Hub file is loaded as it is:
    its bits are read from its tensors, not from its name."""
    from .loading import load

    return load(path, dtype=dtype, kv_bits=kv_bits, image_kv_bits=image_kv_bits)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
