"""WAV reading (every common sample format, written here byte by byte) and writing."""

from __future__ import annotations

import struct
import warnings
import wave

import numpy as np
import pytest

from moshivis_mlx.audio.wav import (
    AudioFileError,
    TruncatedAudioWarning,
    WavWriter,
    read_wav,
    read_wav_mono,
    write_wav,
)

PCM, FLOAT, EXTENSIBLE = 1, 3, 0xFFFE


def wav_bytes(payload: bytes, *, tag: int, channels: int, rate: int, bits: int, sub_tag: int | None = None,
              data_size: int | None = None, extra_chunks: bytes = b"") -> bytes:
    """A WAV file assembled by hand, independently of the code under test."""
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits)
    if tag == EXTENSIBLE:
        guid_tail = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
        fmt += struct.pack("<HHI", 22, bits, 0) + struct.pack("<H", sub_tag) + guid_tail
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + extra_chunks
    body += b"data" + struct.pack("<I", len(payload) if data_size is None else data_size) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


SIGNAL = np.array([0.0, 0.5, -0.5, 0.25, -1.0, 0.75], np.float64)


def encoded(bits: int, kind: str) -> bytes:
    if kind == "float":
        return SIGNAL.astype("<f4" if bits == 32 else "<f8").tobytes()
    if bits == 8:
        return np.round(SIGNAL * 128 + 128).clip(0, 255).astype(np.uint8).tobytes()
    scale = 2 ** (bits - 1)
    ints = np.round(SIGNAL * scale).clip(-scale, scale - 1).astype(np.int64)
    if bits == 24:
        return b"".join(int(v).to_bytes(3, "little", signed=True) for v in ints)
    return ints.astype(f"<i{bits // 8}").tobytes()


@pytest.mark.parametrize(
    "bits,kind,tolerance",
    [(8, "pcm", 1 / 128), (16, "pcm", 1 / 2**15), (24, "pcm", 1 / 2**23), (32, "pcm", 1 / 2**31),
     (32, "float", 0), (64, "float", 0)],
)
@pytest.mark.parametrize("extensible", [False, True])
def test_every_sample_format_reads_back(tmp_path, bits, kind, tolerance, extensible):
    tag = FLOAT if kind == "float" else PCM
    data = wav_bytes(encoded(bits, kind), tag=EXTENSIBLE if extensible else tag, sub_tag=tag,
                     channels=1, rate=16000, bits=bits, extra_chunks=b"LIST\x04\x00\x00\x00abcd")
    path = tmp_path / "x.wav"
    path.write_bytes(data)
    samples, rate = read_wav(path)
    assert rate == 16000 and samples.shape == (len(SIGNAL), 1) and samples.dtype == np.float32
    np.testing.assert_allclose(samples[:, 0], SIGNAL, atol=tolerance + 1e-7)


def test_stereo_is_averaged_and_resampled(tmp_path):
    rate, n = 48000, 48000
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(n) / rate)
    stereo = np.stack([tone, tone * 0.5], axis=1)  # average: 0.75 x tone
    path = tmp_path / "s.wav"
    path.write_bytes(wav_bytes((np.round(stereo * 32767)).astype("<i2").tobytes(), tag=PCM, channels=2,
                               rate=rate, bits=16))
    mono = read_wav_mono(path, 24000)
    assert len(mono) == 24000
    ideal = 0.75 * 0.5 * np.sin(2 * np.pi * 440 * np.arange(24000) / 24000)
    np.testing.assert_allclose(mono[2000:-2000], ideal[2000:-2000], atol=2e-4)


def test_12_bit_samples_in_16_bit_containers(tmp_path):
    data = bytearray(wav_bytes(encoded(16, "pcm"), tag=PCM, channels=1, rate=8000, bits=16))
    data[34:36] = struct.pack("<H", 12)  # bits per sample: 12, block align stays 2 bytes
    path = tmp_path / "12.wav"
    path.write_bytes(bytes(data))
    np.testing.assert_allclose(read_wav(path)[0][:, 0], SIGNAL, atol=1 / 2**15)


def test_oversized_data_chunk_keeps_what_is_there(tmp_path):
    """Streaming recorders leave the data size unset (0xFFFFFFFF) or too large."""
    path = tmp_path / "stream.wav"
    path.write_bytes(wav_bytes(encoded(16, "pcm") + b"\x01", tag=PCM, channels=1, rate=8000, bits=16,
                               data_size=0xFFFFFFFF))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unset size is not a truncated file: no warning
        samples, _ = read_wav(path)
    assert samples.shape == (len(SIGNAL), 1)  # the odd trailing byte is not half a sample


def test_truncated_file_is_read_with_a_warning_naming_it_and_the_seconds(tmp_path):
    path = tmp_path / "cut.wav"
    payload = np.zeros(2 * 8000, "<i2").tobytes()  # 1 s of stereo at 8 kHz
    path.write_bytes(wav_bytes(payload, tag=PCM, channels=2, rate=8000, bits=16, data_size=3 * len(payload)))
    with pytest.warns(TruncatedAudioWarning) as caught:
        samples, _ = read_wav(path)
    assert samples.shape == (8000, 2)
    message = str(caught[0].message)
    assert str(path) in message and "promises 3.00 s" in message and "holds 1.00 s" in message


def test_complete_file_reads_without_warnings(tmp_path):
    path = tmp_path / "whole.wav"
    write_wav(path, np.zeros(800, np.float32), 8000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_wav(path)[0].shape == (800, 1)


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "not a WAV file"),
        (b"hello, this is text and not audio", "not a WAV file"),
        (wav_bytes(b"", tag=PCM, channels=1, rate=8000, bits=16), "holds no audio"),
        (wav_bytes(b"\x00" * 10, tag=7, channels=1, rate=8000, bits=8), "mu-law"),
        (wav_bytes(b"\x00" * 12, tag=PCM, channels=1, rate=8000, bits=48), "unsupported sample size"),
        (wav_bytes(b"\x00" * 8, tag=PCM, channels=0, rate=8000, bits=16), "malformed"),
        (b"RIFF\x04\x00\x00\x00WAVE", "without a 'fmt ' chunk"),
        (wav_bytes(np.array([np.nan], "<f4").tobytes(), tag=FLOAT, channels=1, rate=8000, bits=32), "NaN"),
    ],
)
def test_unusable_files_get_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    with pytest.raises(AudioFileError, match=message) as info:
        read_wav(path)
    assert str(path) in str(info.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(AudioFileError, match="no such file"):
        read_wav(tmp_path / "absent.wav")
    with pytest.raises(AudioFileError, match="is a directory"):
        read_wav(tmp_path)


def test_writer_is_atomic_and_readable_by_the_standard_library(tmp_path):
    path = tmp_path / "out.wav"
    stereo = np.stack([SIGNAL, -SIGNAL], axis=1).astype(np.float32)
    writer = WavWriter(path, 24000, channels=2)
    writer.write(stereo[:3])
    assert not path.exists()  # nothing under the final name until it is complete
    writer.write(stereo[3:])
    writer.close()
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (2, 2, 24000, 6)
    samples, _ = read_wav(path)
    np.testing.assert_allclose(samples, stereo, atol=1 / 32767)
    assert list(tmp_path.iterdir()) == [path]


def test_writer_clips_and_discards_on_error(tmp_path):
    path = tmp_path / "loud.wav"
    write_wav(path, np.array([2.0, -3.0, 0.0], np.float32), 24000)
    np.testing.assert_allclose(read_wav(path)[0][:, 0], [1.0 * 32767 / 32768, -32767 / 32768, 0.0], atol=1e-6)
    broken = tmp_path / "broken.wav"
    with pytest.raises(RuntimeError):
        with WavWriter(broken, 24000) as writer:
            writer.write(np.zeros(10, np.float32))
            raise RuntimeError("interrupted")
    assert not broken.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["loud.wav"]
