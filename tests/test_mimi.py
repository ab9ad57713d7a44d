"""Mimi through rustymimi (random full-size weights), and its renewal past rustymimi's length limit."""

from __future__ import annotations

import numpy as np
import pytest

from moshivis_mlx.mimi import (
    MIMI_CODEBOOK_SIZE,
    MIMI_FRAME_SIZE,
    MIMI_NUM_CODEBOOKS,
    MimiError,
    RenewingCodec,
    RustyMimi,
    load_mimi,
)
from talk_support import FakeCodec, speech_like


def frames(count: int) -> list[np.ndarray]:
    audio = speech_like(count * MIMI_FRAME_SIZE / 24000)
    return [audio[i * MIMI_FRAME_SIZE : (i + 1) * MIMI_FRAME_SIZE] for i in range(count)]


def test_one_frame_each_way(mimi_path):
    mimi = load_mimi(mimi_path)
    for frame in frames(3):
        codes = mimi.encode(frame)
        assert codes.shape == (MIMI_NUM_CODEBOOKS,) and codes.min() >= 0 and codes.max() < MIMI_CODEBOOK_SIZE
        pcm = mimi.decode(codes)
        assert pcm.shape == (MIMI_FRAME_SIZE,) and pcm.dtype == np.float32 and np.isfinite(pcm).all()


def test_rustymimi_alone_stops_after_max_seq_len_over_two_frames(mimi_path):
    """Why `RenewingCodec` exists: rustymimi's default (8192) ends a stream after 5.5 minutes."""
    mimi = RustyMimi(mimi_path, max_seq_len=24)
    assert mimi.max_frames == 12
    for frame in frames(12):
        mimi.encode(frame)
    with pytest.raises(ValueError, match="narrow"):
        mimi.encode(frames(1)[0])


def test_renewal_runs_real_mimi_past_its_limit(mimi_path):
    codec = RenewingCodec(lambda: RustyMimi(mimi_path, max_seq_len=24), overlap_frames=3)
    for frame in frames(30):  # 2.5 instance lifetimes
        pcm = codec.decode(codec.encode(frame))
        assert np.isfinite(pcm).all()
    assert codec.renewals >= 2


class Recorder(FakeCodec):
    """Remembers which frames (by index) it encoded and decoded."""

    instances: list["Recorder"] = []

    def __init__(self):
        super().__init__(max_frames=10)
        self.seen = {"encode": [], "decode": []}
        Recorder.instances.append(self)

    def encode(self, frame):
        self.seen["encode"].append(int(frame[0]))
        return super().encode(frame)

    def decode(self, codes):
        self.seen["decode"].append(int(codes[0]))
        return super().decode(codes)


def test_renewal_schedule_feeds_the_successor_before_switching():
    Recorder.instances = []
    codec = RenewingCodec(Recorder, overlap_frames=4)
    for i in range(40):
        codec.decode(np.full(MIMI_NUM_CODEBOOKS, i))
        codec.encode(np.full(MIMI_FRAME_SIZE, i, np.float32))
    instances = Recorder.instances
    assert len(instances) >= 4 and codec.renewals == len(instances) - 1 - (codec._next is not None)
    switched = instances[: codec.renewals + 1]
    for older, newer in zip(switched, switched[1:]):
        for kind in ("encode", "decode"):
            a, b = older.seen[kind], newer.seen[kind]
            assert a == list(range(a[0], a[-1] + 1)) and len(a) <= older.max_frames  # contiguous, within the limit
            both = set(a) & set(b)
            assert len(both) >= 4 and max(both) == a[-1]  # fed together for the overlap, then the old one stops
            assert b[0] == min(both)  # the new one missed nothing since it started


def test_reset_starts_a_fresh_stream():
    Recorder.instances = []
    codec = RenewingCodec(Recorder, overlap_frames=4)
    for _ in range(8):
        codec.decode(codec.encode(np.zeros(MIMI_FRAME_SIZE, np.float32)))
    assert len(Recorder.instances) == 2  # the successor is warming up
    codec.reset()
    for _ in range(5):
        codec.decode(codec.encode(np.zeros(MIMI_FRAME_SIZE, np.float32)))
    assert Recorder.instances[0].encoded == 5 and len(Recorder.instances) == 2


def test_overlap_must_fit_in_a_lifetime():
    with pytest.raises(ValueError, match="at least twice the overlap"):
        RenewingCodec(lambda: FakeCodec(max_frames=10), overlap_frames=6)
    RenewingCodec(lambda: FakeCodec(max_frames=10), overlap_frames=5)


def test_bad_mimi_files(tmp_path):
    with pytest.raises(MimiError, match="no such Mimi checkpoint"):
        load_mimi(tmp_path / "absent.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(MimiError, match="not a usable Mimi checkpoint"):
        load_mimi(bad)
