"""Mimi through rustymimi (random full-size weights), and its renewal past rustymimi's length limit."""

from __future__ import annotations

import numpy as np
import pytest

from moshivis_mlx.audio.mimi import (
    DECODE,
    ENCODE,
    MIMI_CODEBOOK_SIZE,
    MIMI_FRAME_SIZE,
    MIMI_NUM_CODEBOOKS,
    InProcess,
    MimiError,
    MimiProcess,
    RenewingCodec,
    RenewingCoder,
    RustyMimi,
    _request,
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


def test_the_worker_steps_k_frames_in_one_request(mimi_path):
    """codec_worker's protocol: a request of k frames (12 as 5 + 5 + 2) is one rustymimi step,
    answered with k frames, as k one-frame steps would be (pcm within 1e-5)."""
    inputs = np.stack(frames(12))
    model_codes = np.random.default_rng(0).integers(0, MIMI_CODEBOOK_SIZE, (12, MIMI_NUM_CODEBOOKS))
    single = RustyMimi(mimi_path)
    want_codes = np.stack([single.encode(f) for f in inputs])
    want_pcm = np.stack([single.decode(c) for c in model_codes])
    process = MimiProcess(mimi_path)
    try:
        process.wait_ready()
        got_codes, got_pcm = [], []
        for start in range(0, 12, 5):
            process._send(_request(ENCODE, inputs[start : start + 5], answer=True))
            got_codes.append(np.frombuffer(process._expect(b"O"), np.int64).reshape(-1, MIMI_NUM_CODEBOOKS))
            process._send(_request(DECODE, model_codes[start : start + 5], answer=True))
            got_pcm.append(np.frombuffer(process._expect(b"O"), np.float32).reshape(-1, MIMI_FRAME_SIZE))
    finally:
        process.close()
    assert [len(c) for c in got_codes] == [5, 5, 2]
    np.testing.assert_array_equal(np.concatenate(got_codes), want_codes)
    np.testing.assert_allclose(np.concatenate(got_pcm), want_pcm, rtol=0, atol=1e-5)


def run_codec(codec, inputs: list[np.ndarray], model_codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    codes = np.stack([codec.encode(f) for f in inputs])
    pcm = np.stack([codec.decode(c) for c in model_codes])
    return codes, pcm


def replay(path, direction: str, inputs, takeovers, first: int, life_frames: int) -> np.ndarray:
    """What a renewing coder should have answered from frame `first` (a fresh instance there): its
    schedule (`takeovers`) replayed in this process, every instance fed frame by frame."""
    make = lambda: RustyMimi(path, max_seq_len=2 * life_frames)  # noqa: E731
    current, successor, out = make(), None, []
    for i, data in enumerate(inputs, start=first):
        for fed_from, answers_from in takeovers:
            if answers_from == i:
                current, successor = successor, None
            if fed_from == i:
                successor = make()
        out.append(getattr(current, direction)(data))
        if successor is not None:
            getattr(successor, direction)(data)
    return np.stack(out)


def test_real_mimi_reset_and_chunked_renewals_match_frame_by_frame_instances(mimi_path):
    """Short-lived instances (100 frames, 12 of overlap: a chunk of 5, then 2, then one frame at a
    time, in child processes): a reset, then renewals each way. The answers equal those of
    rustymimi instances in this process, fresh at the reset, fed frame by frame on the same
    schedule (which frame a successor takes over at depends on timing, so the schedule is the
    coder's own): codes identical, pcm within 1e-5 (rustymimi's decode_step on 5 frames differs
    from 5 steps by ~6e-7: float32 sums in another order). Lives leave ~1.5 s of codec work
    between a take-over and the next renewal for each spare to build, even on a busy machine."""
    life_frames, overlap, before, after = 100, 12, 20, 170
    inputs = frames(before + after)
    model_codes = np.random.default_rng(0).integers(0, MIMI_CODEBOOK_SIZE, (before + after, MIMI_NUM_CODEBOOKS))
    codec = load_mimi(mimi_path, max_seq_len=2 * life_frames, overlap_frames=overlap)
    assert codec.encoder.feed_chunk == 5
    try:
        run_codec(codec, inputs[:before], model_codes[:before])
        codec.reset()
        codes, pcm = run_codec(codec, inputs[before:], model_codes[before:])
        assert codec.encoder.renewals >= 2 and codec.decoder.renewals >= 2
        assert codec.encoder.waits == codec.decoder.waits == 0  # every successor was built before it was needed
    finally:
        codec.close()
    for coder in (codec.encoder, codec.decoder):  # frames come faster than real time here: a successor
        for fed_from, answers_from in coder.takeovers:  # may be waited for when its catch-up time ends
            assert overlap <= answers_from - fed_from <= overlap + coder.catch_up_frames
    want_codes = replay(mimi_path, ENCODE, inputs[before:], codec.encoder.takeovers, before, life_frames)
    want_pcm = replay(mimi_path, DECODE, model_codes[before:], codec.decoder.takeovers, before, life_frames)
    np.testing.assert_array_equal(codes, want_codes)
    np.testing.assert_allclose(pcm, want_pcm, rtol=0, atol=1e-5)
    assert np.isfinite(pcm).all() and np.abs(pcm).max() > 0.01


def test_renewed_instances_match_one_long_instance_until_the_switch(mimi_path):
    """Until the first switch the renewing codec is one instance, whatever its successor is fed."""
    inputs = frames(30)
    renewing = load_mimi(mimi_path, max_seq_len=40, overlap_frames=6, feed_chunk=1)  # 20-frame lives
    single = RustyMimi(mimi_path)
    try:
        got = [renewing.encode(f) for f in inputs]
    finally:
        renewing.close()
    want = [single.encode(f) for f in inputs]
    switch = renewing.encoder.takeovers[0][1]
    assert 16 <= switch <= 20  # renewal at 10, 6 frames of overlap, then at most 4 of catch-up
    np.testing.assert_array_equal(np.stack(got[:switch]), np.stack(want[:switch]))


class Recorder(FakeCodec):
    """Remembers which frames (by index) it encoded and decoded."""

    instances: list["Recorder"] = []

    def __init__(self, max_frames: int):
        super().__init__(max_frames=max_frames)
        self.seen = {"encode": [], "decode": []}
        Recorder.instances.append(self)

    def encode(self, frame):
        self.seen["encode"].append(int(frame[0]))
        return super().encode(frame)

    def decode(self, codes):
        self.seen["decode"].append(int(codes[0]))
        return super().decode(codes)


def recording_codec(overlap: int = 4, feed_chunk: int = 2, life: int = 30) -> RenewingCodec:
    Recorder.instances = []
    return RenewingCodec(lambda: InProcess(Recorder(life)), overlap_frames=overlap, feed_chunk=feed_chunk)


def test_renewal_schedule_feeds_the_successor_before_switching():
    codec = recording_codec()
    for i in range(90):
        codec.decode(np.full(MIMI_NUM_CODEBOOKS, i))
        codec.encode(np.full(MIMI_FRAME_SIZE, i, np.float32))
    assert codec.encoder.renewals >= 4 and codec.decoder.renewals >= 4
    for kind in ("encode", "decode"):
        used = [r.seen[kind] for r in Recorder.instances if r.seen[kind]]
        assert all(not r.seen["encode"] or not r.seen["decode"] for r in Recorder.instances)  # one direction each
        for older, newer in zip(used, used[1:]):
            assert older == list(range(older[0], older[-1] + 1)) and len(older) <= 30  # contiguous, within the limit
            both = set(older) & set(newer)
            # an instance in this process is never behind: it takes over right after the overlap
            assert len(both) == 4 and max(both) == older[-1]  # fed together for the overlap, then the old one stops
            assert newer[0] == min(both)  # the new one missed nothing since it started


def test_the_directions_renew_at_different_times():
    """The decoder's first renewal comes half a period after the encoder's, so the two never overlap."""
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
    while codec.encoder._successor is None:  # the encoder is feeding a successor: its spare is in use
        codec.decode(codec.encode(np.zeros(MIMI_FRAME_SIZE, np.float32)))
    assert codec.encoder._spare is None
    codec.reset()
    assert codec.encoder._successor is None
    for _ in range(30):
        codec.decode(codec.encode(np.zeros(MIMI_FRAME_SIZE, np.float32)))
    assert codec.encoder.renewals >= 1


def test_overlap_must_fit_in_a_lifetime():
    """A life holds two successors' feeding: the overlap and the catch-up (4 * feed_chunk) each."""
    with pytest.raises(ValueError, match="at least twice the overlap"):
        RenewingCodec(lambda: InProcess(FakeCodec(max_frames=12)), overlap_frames=3, feed_chunk=1)
    RenewingCodec(lambda: InProcess(FakeCodec(max_frames=12)), overlap_frames=2, feed_chunk=1)
    with pytest.raises(ValueError, match="at least twice the overlap"):
        RenewingCodec(lambda: InProcess(FakeCodec(max_frames=60)), overlap_frames=11, feed_chunk=5)
    RenewingCodec(lambda: InProcess(FakeCodec(max_frames=60)), overlap_frames=10, feed_chunk=5)
    with pytest.raises(ValueError, match="feed_chunk"):
        RenewingCodec(lambda: InProcess(FakeCodec(max_frames=60)), overlap_frames=10, feed_chunk=0)


# -- the schedule in time: stand-ins whose successors work on a clock --------------------------


class Clock:
    now = -100.0  # in frames (80 ms each); the codec's first instances are built before frame 0


class Scripted:
    """A `CodecInstance` on a clock: it builds in `build` frames, and a request of m fed frames takes
    it `per_call + per_frame * m` frames of time, one request after another (a process of its own;
    rustymimi's cost is about 25 ms a call and 20 ms a frame, against 80 ms frames: 0.25 and 0.25).
    It records what it is fed, chunk by chunk and whether it was busy then, and what it answers;
    it fails past its life, like rustymimi."""

    def __init__(self, clock: Clock, life: int, per_frame: float, per_call: float = 0.25, build: float = 3):
        self.clock, self.max_frames, self.per_frame, self.per_call = clock, life, per_frame, per_call
        self.built_at = clock.now + build
        self.busy_until = 0.0
        self.seen = 0
        self.chunks: list[list[int]] = []
        self.answered: list[int] = []
        self.sent_unbuilt = self.synced_behind = self.waited_for_build = 0
        self.closed = False

    def ready(self) -> bool:
        return self.clock.now >= self.built_at

    def wait_ready(self) -> None:
        assert self.ready(), "waited for a load"

    def _see(self, count: int) -> None:
        assert not self.closed
        self.seen += count
        assert self.seen <= self.max_frames, "past the life of an instance"

    def run(self, direction: str, data: np.ndarray) -> tuple["Scripted", int]:
        if not self.ready():  # a process would wait for its build here
            self.waited_for_build += 1
            self.built_at = self.clock.now
        assert self.caught_up(), "answered with work still queued"
        self._see(1)
        self.answered.append(int(data[0]))
        return self, int(data[0])

    def feed(self, direction: str, frames: np.ndarray) -> None:
        self._see(len(frames))
        self.sent_unbuilt += not self.ready()
        self.chunks.append([int(f[0]) for f in frames])
        begin = max(self.busy_until, self.clock.now, self.built_at)
        self.busy_until = begin + self.per_call + self.per_frame * len(frames)

    def caught_up(self) -> bool:
        return self.ready() and self.clock.now >= self.busy_until

    def sync(self) -> None:
        if not self.caught_up():
            self.synced_behind += 1  # a real instance would block here
            self.busy_until = self.clock.now

    def close(self) -> None:
        self.closed = True


def scripted_coder(per_frame: float, life: int = 60, overlap: int = 9, feed_chunk: int = 3, **kwargs):
    clock, made = Clock(), []

    def start():
        made.append(Scripted(clock, life, per_frame, **kwargs))
        return made[-1]

    return clock, made, RenewingCoder(start, ENCODE, overlap_frames=overlap, feed_chunk=feed_chunk)


def drive(clock: Clock, coder: RenewingCoder, first: int, count: int) -> list:
    """`count` frames, one every 80 ms, from one reused buffer (as an audio callback would pass them)."""
    buffer, out = np.zeros(MIMI_FRAME_SIZE, np.float32), []
    for i in range(first, first + count):
        clock.now = i
        buffer[:] = i
        out.append(coder(buffer))
    return out


def check_successors(made: list, coder: RenewingCoder, overlap: int, feed_chunk: int) -> None:
    """Each successor was fed every frame from its start: chunks of `feed_chunk`, then from
    `single_frames` before the overlap's end what was buffered with the frame, then one frame at
    a time; it answered from the frame after the last one fed."""
    successors = [m for m in made if m.chunks]
    assert len(successors) >= len(coder.takeovers)
    for successor, (fed_from, answers_from) in zip(successors, coder.takeovers):
        fed = [i for chunk in successor.chunks for i in chunk]
        assert fed == list(range(fed_from, answers_from))
        assert successor.answered[0] == answers_from
        full, rest = divmod(overlap - coder.single_frames, feed_chunk)
        sizes = [len(c) for c in successor.chunks]
        assert sizes[: full + 1] == [feed_chunk] * full + [rest + 1]
        assert all(size == 1 for size in sizes[full + 1 :])
        assert successor.sent_unbuilt == 0  # no successor was fed before it was built


def test_a_successor_with_rustymimis_costs_takes_over_right_after_the_overlap():
    """rustymimi's costs (a frame in half a frame's time, 3 in 1, 5 in 1.5): chunks of 3, then the
    overlap's last frames one at a time, so the successor has caught up when the overlap ends and
    answers the next frame; no frame waits for it (no sync finds it behind)."""
    clock, made, coder = scripted_coder(per_frame=0.25)
    out = drive(clock, coder, 0, 240)
    assert coder.renewals >= 5 and coder.waits == coder.stalls == 0
    assert all(m.synced_behind == 0 for m in made)
    assert all(answers_from - fed_from == 9 for fed_from, answers_from in coder.takeovers)
    successors = [m for m in made if m.chunks][: coder.renewals]
    assert coder.single_frames == 4 and all([len(c) for c in m.chunks] == [3, 3, 1, 1, 1] for m in successors)
    check_successors(made, coder, overlap=9, feed_chunk=3)
    assert [i for _, i in out] == list(range(240))  # every frame answered once, in order
    starts = [fed_from for fed_from, _ in coder.takeovers]
    assert np.all(np.diff(starts) == coder.renewal_period)  # renewals on a fixed period
    clock, made, coder = scripted_coder(per_frame=0.25, overlap=7, feed_chunk=5)  # 7 = one chunk, 2 singles
    drive(clock, coder, 0, 200)
    assert coder.renewals >= 5 and coder.stalls == 0 and coder.single_frames == 3
    assert all(answers_from - fed_from == 7 for fed_from, answers_from in coder.takeovers)
    check_successors(made, coder, overlap=7, feed_chunk=5)


def test_a_slower_successor_takes_over_once_caught_up():
    """A busy machine (a frame takes the successor 0.875 of a frame): still behind when the overlap
    ends, it is fed frame by frame while the old instance answers, and takes over once it has
    caught up, before its catch-up time runs out: no frame waits for it."""
    clock, made, coder = scripted_coder(per_frame=0.5, per_call=0.375)
    out = drive(clock, coder, 0, 240)
    assert coder.renewals >= 5 and coder.waits == coder.stalls == 0
    assert all(m.synced_behind == 0 for m in made)
    delays = [answers_from - fed_from - 9 for fed_from, answers_from in coder.takeovers]
    assert all(0 < d < coder.catch_up_frames for d in delays)
    check_successors(made, coder, overlap=9, feed_chunk=3)
    assert [i for _, i in out] == list(range(240))
    starts = [fed_from for fed_from, _ in coder.takeovers]
    assert np.all(np.diff(starts) == coder.renewal_period)  # whatever the delays


def test_a_successor_that_never_catches_up_is_waited_for_at_the_end_of_a_life():
    """Too slow to keep up (a frame takes it more than a frame): the old instance answers until the
    catch-up time runs out, then the successor is synced (counted in `stalls`); no frame is lost."""
    clock, made, coder = scripted_coder(per_frame=1.0)
    out = drive(clock, coder, 0, 150)
    assert coder.renewals >= 3 and coder.stalls == coder.renewals
    assert all(answers_from - fed_from == 9 + coder.catch_up_frames for fed_from, answers_from in coder.takeovers)
    check_successors(made, coder, overlap=9, feed_chunk=3)
    assert [i for _, i in out] == list(range(150))


def test_a_reset_during_a_chunked_renewal():
    """A reset while a chunk is in flight and frames are buffered: the successor is dropped with
    what it was not sent, a fresh instance answers from the next frame, and the schedule starts
    again from the reset. Its spare being the successor, the reset has to build one: that frame
    waits for a load (counted), as it did before chunks."""
    clock, made, coder = scripted_coder(per_frame=0.375)
    first = 0
    while not (coder._successor is not None and coder._pending and coder._successor.chunks):
        drive(clock, coder, first, 1)
        first += 1
    successor, buffered = coder._successor, [int(f[0]) for f in coder._pending]
    assert coder._spare is None and buffered == list(range(first - len(buffered), first))
    coder.reset()
    assert successor.closed and coder._current is not successor and not coder._pending
    assert [i for chunk in successor.chunks for i in chunk][-1] < buffered[0]  # buffered, never sent
    out = drive(clock, coder, first, 150)
    fresh = out[0][0]
    assert fresh is not successor and fresh.answered[0] == first and fresh.waited_for_build == 1
    assert coder.waits == 1 and coder.stalls == 0
    after = [t for t in coder.takeovers if t[0] >= first]
    assert len(after) >= 3 and after[0][0] == first + coder.renewal_period
    check_successors([m for m in made if m is not successor], coder, overlap=9, feed_chunk=3)
    assert sum(m.waited_for_build for m in made) == 1  # the renewals after it waited for nothing


def test_bad_mimi_files(tmp_path):
    with pytest.raises(MimiError, match="no such Mimi checkpoint"):
        load_mimi(tmp_path / "absent.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(MimiError, match="not a usable Mimi checkpoint"):
        load_mimi(bad)
