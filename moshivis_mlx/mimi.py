"""Mimi, Kyutai's streaming audio codec, through `rustymimi`.

24 kHz mono; every 80 ms frame (1920 samples) becomes 8 codes of 2048 values
and back. `rustymimi` precomputes its rotary embeddings for a fixed number of
positions (8192 by default: its transformers run at 25 Hz, so a stream fails
after 5.5 minutes). `Mimi` removes that limit: before an instance runs out,
a fresh one is fed the same frames alongside it for `RENEWAL_OVERLAP_FRAMES`
and then takes over. The codec's attention layers see the last 250 steps
(10 s) with relative positions, and its convolutions a few frames, so the
state depends on the past only through the last tens of seconds (8 stacked
layers of 10 s each, fading): after 30 s of overlap the successor's output
differs from the old instance's by 0.5% of the signal (measured with random
weights, benchmarks/bench_mimi.py), and the codes are identical.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

import numpy as np

MIMI_SAMPLE_RATE = 24_000
MIMI_FRAME_SIZE = 1920  # samples per 80 ms frame (12.5 Hz)
MIMI_CODEBOOK_SIZE = 2048  # codes per codebook: values 0..2047
MIMI_NUM_CODEBOOKS = 8  # codebooks MoshiVis uses, of the 32 Mimi has
MIMI_STEPS_PER_FRAME = 2  # Mimi's transformers run at 25 Hz
RENEWAL_OVERLAP_FRAMES = 375  # 30 s: a decoder fed 12 s differs by 20% of the signal, 24 s: 1.5%
MAX_SEQ_LEN = 32_768  # positions precomputed per instance (~22 min; ~8 MB of tables)


class StreamingCodec(Protocol):
    """What a conversation needs from a codec (Mimi, or a stand-in in tests)."""

    sample_rate: int
    frame_size: int
    codebook_size: int
    num_codebooks: int

    def encode(self, frame: np.ndarray) -> np.ndarray: ...  # (frame_size,) float32 -> (num_codebooks,) int
    def decode(self, codes: np.ndarray) -> np.ndarray: ...  # (num_codebooks,) int -> (frame_size,) float32
    def reset(self) -> None: ...


class MimiError(RuntimeError):
    """Mimi could not be loaded or run."""


class RustyMimi:
    """One `rustymimi.Tokenizer`, frame by frame. It fails after
    `max_seq_len // 2` frames; use `Mimi`, which renews it."""

    sample_rate = MIMI_SAMPLE_RATE
    frame_size = MIMI_FRAME_SIZE
    codebook_size = MIMI_CODEBOOK_SIZE

    def __init__(self, path: str | Path, num_codebooks: int = MIMI_NUM_CODEBOOKS, max_seq_len: int = MAX_SEQ_LEN):
        try:
            import rustymimi
        except ImportError as e:
            raise MimiError(f"the Mimi codec needs `rustymimi` (pip install rustymimi): {e}") from None
        path = Path(path).expanduser()
        if not path.is_file():
            raise MimiError(f"{path}: no such Mimi checkpoint file")
        self.num_codebooks = num_codebooks
        self.max_frames = max_seq_len // MIMI_STEPS_PER_FRAME
        try:
            self._tokenizer = rustymimi.Tokenizer(str(path), num_codebooks=num_codebooks, max_seq_len=max_seq_len)
        except Exception as e:  # rustymimi raises ValueError with a Rust backtrace
            raise MimiError(f"{path}: not a usable Mimi checkpoint ({_first_line(e)})") from None

    def encode(self, frame: np.ndarray) -> np.ndarray:
        pcm = np.ascontiguousarray(frame, np.float32).reshape(1, 1, -1)
        codes = self._tokenizer.encode_step(pcm)  # (1, num_codebooks, 1) uint32
        return codes[0, :, 0].astype(np.int64)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        codes = np.ascontiguousarray(codes, np.uint32).reshape(1, -1, 1)
        pcm = self._tokenizer.decode_step(codes)  # (1, 1, frame_size) float32
        return pcm[0, 0]

    def reset(self) -> None:
        self._tokenizer.reset()


class RenewingCodec:
    """A streaming codec made of limited instances, renewed before they run out.

    `factory()` makes a fresh instance with a `max_frames` attribute (frames it
    can encode and decode). From `max_frames - overlap` on, a fresh instance
    gets every frame too; after `overlap` frames it replaces the old one.
    """

    def __init__(self, factory: Callable[[], StreamingCodec], overlap_frames: int = RENEWAL_OVERLAP_FRAMES):
        self._factory = factory
        self._current = factory()
        self._next: StreamingCodec | None = None
        self.overlap_frames = overlap_frames
        self.max_frames = int(self._current.max_frames)
        if 2 * overlap_frames > self.max_frames:  # else a successor would have to take over half warmed up
            raise ValueError(f"an instance's life ({self.max_frames} frames) must be at least twice the "
                             f"overlap ({overlap_frames} frames)")
        self.sample_rate = self._current.sample_rate
        self.frame_size = self._current.frame_size
        self.codebook_size = self._current.codebook_size
        self.num_codebooks = self._current.num_codebooks
        self.renewals = 0
        self._counts = [0, 0]  # frames the current instance encoded / decoded
        self._next_counts = [0, 0]

    def _advance(self, kind: int) -> None:
        self._counts[kind] += 1
        if self._next is not None:
            self._next_counts[kind] += 1
            warm = min(self._next_counts) >= self.overlap_frames  # both directions caught up
            if warm or max(self._counts) >= self.max_frames:
                self._current, self._next = self._next, None
                self._counts, self._next_counts = self._next_counts, [0, 0]
                self.renewals += 1
        elif max(self._counts) >= self.max_frames - self.overlap_frames:
            self._next = self._factory()

    def encode(self, frame: np.ndarray) -> np.ndarray:
        codes = self._current.encode(frame)
        if self._next is not None:
            self._next.encode(frame)
        self._advance(0)
        return codes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        pcm = self._current.decode(codes)
        if self._next is not None:
            self._next.decode(codes)
        self._advance(1)
        return pcm

    def reset(self) -> None:
        self._current.reset()
        self._next = None
        self._counts, self._next_counts = [0, 0], [0, 0]


def load_mimi(
    path: str | Path, num_codebooks: int = MIMI_NUM_CODEBOOKS, max_seq_len: int = MAX_SEQ_LEN
) -> RenewingCodec:
    """Mimi from a checkpoint file (`tokenizer-e351c8d8-checkpoint125.safetensors`), with no length limit."""
    return RenewingCodec(lambda: RustyMimi(path, num_codebooks, max_seq_len))


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
