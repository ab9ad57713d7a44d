"""Mimi through rustymimi (random full-size weights), and its renewal past rustymimi's length limit."""

from __future__ import annotations

import numpy as np
import pytest

from moshivis_mlx.audio.mimi import (
    MIMI_CODEBOOK_SIZE,
    MIMI_FRAME_SIZE,
    MIMI_NUM_CODEBOOKS,
    InProcess,
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


def test_a_reset_rustymimi_fails_as_early_as_one_never_reset(mimi_path):
    """Why `reset()` takes a fresh instance: rustymimi's reset does not rewind its positions."""
    mimi = RustyMimi(mimi_path, max_seq_len=24)
    for frame in frames(10):
        mimi.encode(frame)
    mimi.reset()
    mimi.encode(frames(1)[0])
    mimi.encode(frames(1)[0])
    with pytest.raises(ValueError, match="narrow"):
        mimi.encode(frames(1)[0])


def run_codec(codec, inputs: list[np.ndarray], model_codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    codes = np.stack([codec.encode(f) for f in inputs])
    pcm = np.stack([codec.decode(c) for c in model_codes])
    return codes, pcm


def test_real_mimi_reset_and_renewals_match_a_codec_never_reset(mimi_path):
    """Short-lived instances (60 frames, 6 of overlap): a reset, then renewals each way, in child processes.
    Lives are still long enough (~5 s of codec work) for each spare to build before it is needed."""
    life_frames, overlap, before, after = 60, 6, 20, 150
    inputs = frames(before + after)
    model_codes = np.random.default_rng(0).integers(0, MIMI_CODEBOOK_SIZE, (before + after, MIMI_NUM_CODEBOOKS))
    used = load_mimi(mimi_path, max_seq_len=2 * life_frames, overlap_frames=overlap)
    fresh = load_mimi(mimi_path, max_seq_len=2 * life_frames, overlap_frames=overlap)
    try:
        run_codec(used, inputs[:before], model_codes[:before])
        used.reset()
        got = run_codec(used, inputs[before:], model_codes[before:])
        want = run_codec(fresh, inputs[before:], model_codes[before:])
        assert used.encoder.renewals >= 2 and used.decoder.renewals >= 2
        assert used.encoder.waits == used.decoder.waits == 0  # every successor was built before it was needed
    finally:
        used.close()
        fresh.close()
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert np.isfinite(got[1]).all() and np.abs(got[1]).max() > 0


def test_renewed_instances_match_one_long_instance_until_the_switch(mimi_path):
    """Before the first switch the renewing codec is one instance; after it, the successor's codes
    match a never-renewed instance (it has heard the same 8 frames Mimi's short memory needs here)."""
    inputs = frames(30)
    renewing = load_mimi(mimi_path, max_seq_len=40, overlap_frames=8)  # 20-frame lives
    single = RustyMimi(mimi_path)
    try:
        got = [renewing.encode(f) for f in inputs]
    finally:
        renewing.close()
    want = [single.encode(f) for f in inputs]
    np.testing.assert_array_equal(np.stack(got[:20]), np.stack(want[:20]))


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


def recording_codec(overlap: int = 4) -> RenewingCodec:
    Recorder.instances = []
    return RenewingCodec(lambda: InProcess(Recorder()), overlap_frames=overlap)


def test_renewal_schedule_feeds_the_successor_before_switching():
    codec = recording_codec()
    for i in range(40):
        codec.decode(np.full(MIMI_NUM_CODEBOOKS, i))
        codec.encode(np.full(MIMI_FRAME_SIZE, i, np.float32))
    assert codec.encoder.renewals >= 4 and codec.decoder.renewals >= 4
    for kind in ("encode", "decode"):
        used = [r.seen[kind] for r in Recorder.instances if r.seen[kind]]
        assert all(not r.seen["encode"] or not r.seen["decode"] for r in Recorder.instances)  # one direction each
        for older, newer in zip(used, used[1:]):
            assert older == list(range(older[0], older[-1] + 1)) and len(older) <= 10  # contiguous, within the limit
            both = set(older) & set(newer)
            assert len(both) == 4 and max(both) == older[-1]  # fed together for the overlap, then the old one stops
            assert newer[0] == min(both)  # the new one missed nothing since it started


def test_the_directions_renew_at_different_times():
    """The decoder's first instance renews at half its life, so the two never overlap at once."""
    codec = recording_codec(overlap=2)
    feeding = []
    for i in range(60):
        codec.encode(np.full(MIMI_FRAME_SIZE, i, np.float32))
        codec.decode(np.full(MIMI_NUM_CODEBOOKS, i))
        feeding.append((codec.encoder._successor is not None, codec.decoder._successor is not None))
    assert any(e for e, _ in feeding) and any(d for _, d in feeding)
    assert not any(e and d for e, d in feeding)


def test_reset_switches_to_the_spare_at_once():
    codec = recording_codec()
    for _ in range(3):
        codec.decode(codec.encode(np.zeros(MIMI_FRAME_SIZE, np.float32)))
    spares = [codec.encoder._spare.codec, codec.decoder._spare.codec]
    assert all(r.encoded + r.decoded == 0 for r in spares)
    codec.reset()
    assert [codec.encoder._current.codec, codec.decoder._current.codec] == spares  # no wait for a build
    for _ in range(4):
        codec.decode(codec.encode(np.zeros(MIMI_FRAME_SIZE, np.float32)))
    assert spares[0].encoded == 4 and spares[1].decoded == 4
    assert codec.encoder._spare.codec not in spares and codec.encoder.waits == codec.decoder.waits == 0


def test_a_reset_during_a_renewal_builds_what_it_needs():
    codec = recording_codec()
    for _ in range(7):  # both directions are feeding successors: their spares are in use
        codec.decode(codec.encode(np.zeros(MIMI_FRAME_SIZE, np.float32)))
    assert codec.encoder._successor is not None and codec.encoder._spare is None
    codec.reset()
    assert codec.encoder._successor is None
    for _ in range(10):
        codec.decode(codec.encode(np.zeros(MIMI_FRAME_SIZE, np.float32)))


def test_overlap_must_fit_in_a_lifetime():
    with pytest.raises(ValueError, match="at least twice the overlap"):
        RenewingCodec(lambda: InProcess(FakeCodec(max_frames=10)), overlap_frames=6)
    RenewingCodec(lambda: InProcess(FakeCodec(max_frames=10)), overlap_frames=5)


def test_bad_mimi_files(tmp_path):
    with pytest.raises(MimiError, match="no such Mimi checkpoint"):
        load_mimi(tmp_path / "absent.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(MimiError, match="not a usable Mimi checkpoint"):
        load_mimi(bad)
