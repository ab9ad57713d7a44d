"""WAV files in and out.

Reading accepts what people actually have: integer PCM of 8, 16, 24 or 32 bits
and IEEE float of 32 or 64 bits (plain or WAVE_FORMAT_EXTENSIBLE headers), any
sample rate and channel count. The RIFF chunks are parsed here because the
standard `wave` module reads integer PCM only. Writing is 16-bit PCM through
`wave`, into a temporary file renamed into place when complete, so an
interrupted run never leaves a half-written file under the requested name.
"""

from __future__ import annotations

import os
import struct
import warnings
import wave
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .resample import resample

FORMAT_PCM = 0x0001
FORMAT_IEEE_FLOAT = 0x0003
FORMAT_EXTENSIBLE = 0xFFFE
_FORMAT_NAMES = {0x0002: "Microsoft ADPCM", 0x0006: "A-law", 0x0007: "mu-law", 0x0011: "IMA ADPCM", 0x0055: "MP3"}
_PCM_WIDTHS = (1, 2, 3, 4)  # bytes per sample
_FLOAT_WIDTHS = {4: np.float32, 8: np.float64}
_INT16_SCALE = 32767
_UNSET_SIZE = 0xFFFFFFFF  # what streaming writers leave in a size they could not go back to fill in


class AudioFileError(ValueError):
    """An audio file that cannot be used, with the file and the reason."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class TruncatedAudioWarning(UserWarning):
    """A WAV file holds less audio than its header promises: it is used, but it is shorter than meant."""


class _Chunk(NamedTuple):
    body: bytes  # what the file holds
    size: int  # what the header promises


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """(samples (frames, channels) float32 in [-1, 1], sample rate)."""
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AudioFileError(path, "no such file") from None
    except IsADirectoryError:
        raise AudioFileError(path, "is a directory, expected a .wav file") from None
    except OSError as e:
        raise AudioFileError(path, f"cannot read it ({e.strerror or e})") from None
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        kind = "an RF64 WAV (over 4 GB), which is not supported" if data[:4] == b"RF64" else "not a WAV file"
        raise AudioFileError(path, f"{kind}: convert it to a RIFF WAV, e.g. `sox in.xxx out.wav`")
    chunks = _chunks(data)
    if b"fmt " not in chunks:
        raise AudioFileError(path, "WAV file without a 'fmt ' chunk")
    if b"data" not in chunks:
        raise AudioFileError(path, "WAV file without a 'data' chunk (no audio)")
    fmt_tag, channels, rate, width = _parse_format(path, chunks[b"fmt "].body)
    payload = chunks[b"data"].body
    frame_bytes = channels * width
    num_frames = len(payload) // frame_bytes
    if num_frames == 0:
        raise AudioFileError(path, "the WAV file holds no audio (empty 'data' chunk)")
    _warn_if_truncated(path, chunks[b"data"], frame_bytes, rate)
    raw = payload[: num_frames * frame_bytes]
    if fmt_tag == FORMAT_IEEE_FLOAT:
        samples = np.frombuffer(raw, dtype=np.dtype(_FLOAT_WIDTHS[width]).newbyteorder("<")).astype(np.float32)
        if not np.isfinite(samples).all():
            raise AudioFileError(path, "the WAV file holds NaN or infinite samples")
    else:
        samples = _pcm_to_float(raw, width)
    return samples.reshape(num_frames, channels), rate


def read_wav_mono(path: str | Path, sample_rate: int) -> np.ndarray:
    """The file as mono float32 at `sample_rate` (channels averaged, resampled)."""
    samples, rate = read_wav(path)
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    return resample(mono, rate, sample_rate)


def _chunks(data: bytes) -> dict[bytes, _Chunk]:
    """The first chunk of each id; a truncated last chunk keeps what is there."""
    chunks: dict[bytes, _Chunk] = {}
    pos = 12
    while pos + 8 <= len(data):
        chunk_id, size = struct.unpack_from("<4sI", data, pos)
        body = data[pos + 8 : pos + 8 + size]  # streaming writers may leave size unset or too large
        chunks.setdefault(chunk_id, _Chunk(body, size))
        pos += 8 + size + (size & 1)
    return chunks


def _warn_if_truncated(path: Path, chunk: _Chunk, frame_bytes: int, rate: int) -> None:
    """A cut-off download or copy would otherwise pass silently as a shorter question."""
    if chunk.size == _UNSET_SIZE or len(chunk.body) >= chunk.size:
        return
    held, promised = len(chunk.body) // frame_bytes / rate, chunk.size // frame_bytes / rate
    warnings.warn(f"{path}: the WAV file looks truncated: its header promises {promised:.2f} s of audio, the "
                  f"file holds {held:.2f} s; using those {held:.2f} s", TruncatedAudioWarning, stacklevel=3)


def _parse_format(path: Path, fmt: bytes) -> tuple[int, int, int, int]:
    """(PCM or float tag, channels, sample rate, bytes per sample) from a 'fmt ' chunk."""
    if len(fmt) < 16:
        raise AudioFileError(path, "malformed WAV header ('fmt ' chunk too short)")
    tag, channels, rate, _byte_rate, block_align, bits = struct.unpack_from("<HHIIHH", fmt)
    if tag == FORMAT_EXTENSIBLE:
        if len(fmt) < 26:
            raise AudioFileError(path, "malformed WAVE_FORMAT_EXTENSIBLE header")
        tag = struct.unpack_from("<H", fmt, 24)[0]  # first two bytes of the sub-format GUID
    if channels == 0 or rate == 0:
        raise AudioFileError(path, f"malformed WAV header ({channels} channels at {rate} Hz)")
    width = block_align // channels if block_align else (bits + 7) // 8
    if tag == FORMAT_PCM and width in _PCM_WIDTHS:
        return tag, channels, rate, width
    if tag == FORMAT_IEEE_FLOAT and width in _FLOAT_WIDTHS:
        return tag, channels, rate, width
    if tag in (FORMAT_PCM, FORMAT_IEEE_FLOAT):
        problem = f"unsupported sample size ({bits} bits)"
    else:
        problem = f"unsupported WAV encoding ({_FORMAT_NAMES.get(tag, f'format tag 0x{tag:04x}')})"
    raise AudioFileError(path, f"{problem}: convert it to 16-bit PCM, e.g. `sox in.wav -b 16 -e signed out.wav`")


def _pcm_to_float(raw: bytes, width: int) -> np.ndarray:
    if width == 1:  # 8-bit WAV is unsigned
        return (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    if width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        values = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        values = np.where(values >= 1 << 23, values - (1 << 24), values)
        return (values / float(1 << 23)).astype(np.float32)
    dtype = {2: "<i2", 4: "<i4"}[width]
    return (np.frombuffer(raw, dtype).astype(np.float64) / float(1 << (8 * width - 1))).astype(np.float32)


def float_to_int16(samples: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> int16, clipped (never wraps around)."""
    return np.round(np.clip(samples, -1.0, 1.0) * _INT16_SCALE).astype("<i2")


class WavWriter:
    """Writes 16-bit PCM WAV incrementally; the file appears under its name on `close()`.

    `samples` passed to `write` are (frames,) for mono or (frames, channels).
    """

    def __init__(self, path: str | Path, sample_rate: int, channels: int = 1):
        self.path = Path(path).expanduser()
        self.channels = channels
        self.frames_written = 0
        self._tmp = self.path.with_name(f".{self.path.name}.partial")
        try:
            self._wav = wave.open(str(self._tmp), "wb")
        except OSError as e:
            raise AudioFileError(self.path, f"cannot write it ({e.strerror or e})") from None
        self._wav.setnchannels(channels)
        self._wav.setsampwidth(2)
        self._wav.setframerate(int(sample_rate))

    def write(self, samples: np.ndarray) -> None:
        samples = np.asarray(samples, np.float32)
        if samples.ndim == 1:
            samples = samples[:, None]
        if samples.shape[1] != self.channels:
            raise ValueError(f"expected {self.channels} channel(s), got shape {samples.shape}")
        self._wav.writeframesraw(float_to_int16(samples).tobytes())
        self.frames_written += samples.shape[0]

    def close(self) -> None:
        """Finish the header and move the file into place."""
        if self._wav is None:
            return
        self._wav.close()
        self._wav = None
        os.replace(self._tmp, self.path)

    def discard(self) -> None:
        """Drop the partial file (after an error)."""
        if self._wav is not None:
            self._wav.close()
            self._wav = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "WavWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int) -> None:
    """Write a whole signal, (frames,) or (frames, channels), as 16-bit PCM."""
    samples = np.asarray(samples, np.float32)
    channels = 1 if samples.ndim == 1 else samples.shape[1]
    with WavWriter(path, sample_rate, channels) as writer:
        writer.write(samples)


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (temporary file, then rename)."""
    path = Path(path).expanduser()
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
