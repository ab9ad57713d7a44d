"""Helpers for the conversation, file-mode and live-mode tests.

Three stand-ins for the real downloads, all made here:
  * a tiny MoshiVis with random weights: fixture A's sizes, but Mimi's audio
    vocabulary (2048 codes), so it can talk through the real codec;
  * a full-size Mimi with random weights, from the tensor manifest of the real
    checkpoint (tests/fixtures/mimi.manifest.json), cached under .cache/;
  * a 64-piece sentencepiece tokenizer trained on a few made-up sentences.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import zlib
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

import moshivis_mlx as mv
from moshivis_mlx.audio.mimi import MIMI_CODEBOOK_SIZE, MIMI_FRAME_SIZE, MIMI_NUM_CODEBOOKS, MIMI_SAMPLE_RATE

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
MIMI_MANIFEST = FIXTURES / "mimi.manifest.json"
ASSET_CACHE = ROOT / ".cache" / "test-assets"
MIMI_SEED = 1234
MIMI_GENERATOR_VERSION = "1"  # bump when the weight scheme below changes


def talking_config(**overrides) -> mv.ModelConfig:
    """Fixture A's sizes with Mimi's 2048-code audio vocabulary."""
    cfg = mv.ModelConfig.from_dict(json.loads((FIXTURES / "moshivis_tiny_a" / "config.json").read_text()))
    return dataclasses.replace(cfg, audio_card=MIMI_CODEBOOK_SIZE, **overrides)


def build_model(cfg: mv.ModelConfig | None = None, seed: int = 0) -> mv.MoshiVis:
    """Random weights (MLX's default initialisation), float32 for speed on CPU."""
    mx.random.seed(seed)
    model = mv.MoshiVis(cfg or talking_config())
    model.set_dtype(mx.float32)
    model.eval()
    mx.eval(model.parameters())
    return model


def save_checkpoint(model: mv.MoshiVis, directory: Path) -> Path:
    """This project's own layout: config.json + model.safetensors, loadable by `mv.load`."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(model.cfg.to_dict()))
    mx.save_safetensors(str(directory / "model.safetensors"), dict(tree_flatten(model.parameters())))
    return directory


# -- random Mimi ---------------------------------------------------------------------


def _mimi_tensor(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Weights that make the codec run with finite outputs; chosen by the tensor's role.

    Codebooks are stored as sums with usage counters (embedding = sum / usage):
    counters 1, sums N(0, 1). Layer scales 0.05, norm gains 1 and norm biases 0,
    other biases small noise, matrices and kernels N(0, 1/fan_in) (a transposed
    convolution (in, out, k) counts in * k/2 inputs per output). One generator
    per tensor, seeded by its name, so the order of the manifest does not matter.
    """
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    owner, _, leaf = name.rpartition(".")
    if leaf in ("cluster_usage", "_initialized"):
        return np.ones(shape, np.float32)
    if leaf == "embedding_sum":
        return rng.standard_normal(shape, dtype=np.float32)
    if leaf == "scale":
        return np.full(shape, 0.05, np.float32)
    if leaf == "weight" and len(shape) == 1:
        return np.ones(shape, np.float32)
    if leaf == "bias":
        if "norm" in owner.rpartition(".")[2]:
            return np.zeros(shape, np.float32)
        return 0.01 * rng.standard_normal(shape, dtype=np.float32)
    if len(shape) >= 2:
        if "convtr" in name and len(shape) == 3:
            fan_in = max(1, shape[0] * max(1, shape[2] // 2))
        else:
            fan_in = max(1, int(np.prod(shape[1:])))
        return rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(fan_in))
    return 0.01 * rng.standard_normal(shape, dtype=np.float32)


def random_mimi(cache_dir: Path = ASSET_CACHE, seed: int = MIMI_SEED) -> Path:
    """A random full-size Mimi checkpoint (385 MB), made once and cached (never committed)."""
    from safetensors.numpy import save_file

    manifest_bytes = MIMI_MANIFEST.read_bytes()
    key = hashlib.sha256(manifest_bytes + f"{seed}/{MIMI_GENERATOR_VERSION}".encode()).hexdigest()[:16]
    path = cache_dir / f"random-mimi-{key}.safetensors"
    if path.exists():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: np.ascontiguousarray(_mimi_tensor(name, tuple(spec["shape"]), seed))
        for name, spec in sorted(json.loads(manifest_bytes)["tensors"].items())
    }
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)  # atomic: parallel sessions never see half a file
    return path


# -- tokenizer -------------------------------------------------------------------------

_WORDS = (
    "the cat sits on mat a photo of dog in park what do you see this picture red car and blue sky hello "
    "how are today tiny tokenizer for tests looking at window tree house bird flying over water green grass"
).split()


def train_tokenizer(path: Path, vocab_size: int = 64, byte_fallback: bool = False, extra: tuple[str, ...] = ()) -> Path:
    """A sentencepiece model with the real one's special ids (0 unk, 1 bos, 2 eos, 3 pad)."""
    import sentencepiece as spm

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(_WORDS) for _ in range(8)) for _ in range(400)] + list(extra)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(path.with_suffix("")), vocab_size=vocab_size,
        model_type="unigram", unk_id=0, bos_id=1, eos_id=2, pad_id=3, byte_fallback=byte_fallback,
        character_coverage=1.0 if not byte_fallback else 0.99, hard_vocab_limit=not byte_fallback,
        minloglevel=2,
    )
    return path.with_suffix(".model")


# -- a fast stand-in for Mimi ------------------------------------------------------------


class FakeCodec:
    """Deterministic and instantaneous, with Mimi's shapes and rustymimi's failure
    after `max_frames` frames (a ValueError, like its rotary-embedding overflow)."""

    sample_rate = MIMI_SAMPLE_RATE
    frame_size = MIMI_FRAME_SIZE
    codebook_size = MIMI_CODEBOOK_SIZE
    num_codebooks = MIMI_NUM_CODEBOOKS

    def __init__(self, max_frames: int = 10**9):
        self.max_frames = max_frames
        self.encoded = 0
        self.decoded = 0
        self.history: list[tuple[str, int]] = []  # ("encode"/"decode", first sample or code)
        self._basis = np.sin(np.arange(self.frame_size) * 0.01).astype(np.float32)

    def encode(self, frame: np.ndarray) -> np.ndarray:
        if self.encoded >= self.max_frames:
            raise ValueError("narrow invalid args start + len > dim_len")
        self.encoded += 1
        level = int(abs(float(np.sum(frame))) * 1000) % self.codebook_size
        return (np.arange(self.num_codebooks) * 37 + level) % self.codebook_size

    def decode(self, codes: np.ndarray) -> np.ndarray:
        if self.decoded >= self.max_frames:
            raise ValueError("narrow invalid args start + len > dim_len")
        self.decoded += 1
        codes = np.asarray(codes)
        assert codes.shape == (self.num_codebooks,) and 0 <= codes.min() and codes.max() < self.codebook_size
        weights = np.arange(1, self.num_codebooks + 1)
        return self._basis * np.float32((int(codes @ weights) % 997) / 997)

    def reset(self) -> None:
        self.encoded = self.decoded = 0


def rss_bytes() -> int:
    """Resident memory of this process (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def speech_like(seconds: float, rate: int = MIMI_SAMPLE_RATE, seed: int = 0) -> np.ndarray:
    """A few seconds of harmonic, amplitude-modulated noise: something to listen to."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    voice = sum(np.sin(2 * np.pi * f * t) / (i + 1) for i, f in enumerate((180, 360, 540, 720)))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 3 * t))
    return (0.2 * envelope * voice + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def interruptible() -> None:
    """`preexec_fn` for a CLI the test will Ctrl-C: SIGINT back to its default.

    A shell starting a job in the background (`bash .ci/run &`) makes it ignore
    SIGINT, its children inherit that, and a Python started that way keeps
    ignoring it: the test's Ctrl-C would never arrive.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
