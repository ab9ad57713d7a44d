"""File mode's engine: frame accounting, picture switches, and a 10-minute conversation."""

from __future__ import annotations

import numpy as np
import pytest

import moshivis_mlx as mv
from moshivis_mlx.audio.wav import WavWriter, read_wav
from moshivis_mlx.audio.mimi import InProcess, RenewingCodec
from moshivis_mlx.session.offline import ImageSwitch, converse_offline, frames_needed
from moshivis_mlx.model.text import load_tokenizer
from talk_support import FakeCodec, rss_bytes, speech_like

TEN_MINUTES_FRAMES = 7500  # 600 s / 80 ms
RUSTYMIMI_DEFAULT_FRAMES = 4096  # rustymimi's default max_seq_len (8192) / 2
MEMORY_GROWTH_BOUND = 16 * 2**20  # bytes, from frame 1000 to frame 7500


def test_frames_cover_input_and_tail():
    assert frames_needed(0, 0.0, 24000, 1920) == 1
    assert frames_needed(1920, 0.0, 24000, 1920) == 1
    assert frames_needed(1921, 0.0, 24000, 1920) == 2
    assert frames_needed(48000, 1.0, 24000, 1920) == 38  # 72000 samples = 37.5 frames
    with pytest.raises(ValueError, match="tail"):
        frames_needed(10, -1.0, 24000, 1920)


class Spy:
    """Records what file mode asks of a conversation."""

    sample_rate, frame_size, transcript = 24000, 1920, "spy"

    def __init__(self):
        self.calls: list[tuple] = []
        self.answers: list = []

    def push(self, frame):
        self.calls.append(("step", len(frame), float(frame[0])))
        self.answers.append(mv.FrameOutput(len(self.answers), np.ones(self.frame_size, np.float32), "", frame,
                                           0.0, 0.0, {}))

    def receive(self):
        return self.answers.pop(0)

    def set_image(self, image):
        self.calls.append(("image", image))


def test_pictures_switch_at_their_times_and_the_last_frame_is_padded():
    spy = Spy()
    pcm = np.arange(1, 3 * 1920 + 100, dtype=np.float32)  # 3 frames and a bit
    frames = []
    result = converse_offline(spy, pcm, tail_seconds=0.0, on_frame=frames.append,
                              image_switches=[ImageSwitch(0.2, "late"), ImageSwitch(0.0, "first")])
    kinds = [c[0] if c[0] == "step" else c[1] for c in spy.calls]
    # frames start at 0, 0.08, 0.16, 0.24 s: "late" (0.2 s) comes before the frame at 0.24 s
    assert kinds == ["first", "step", "step", "step", "late", "step"]
    assert [c[2] for c in spy.calls if c[0] == "step"] == [1.0, 1921.0, 3841.0, 5761.0]
    assert all(c[1] == 1920 for c in spy.calls if c[0] == "step")
    assert result.frames == 4 and len(frames) == 4 and result.transcript == "spy"
    assert result.seconds == pytest.approx(0.32)


def test_ten_minute_conversation_memory_stays_flat(talking_model, tokenizer_path, tmp_path):
    """7,500 frames through file mode's loop with the tiny model.

    Mimi is replaced by a stand-in that fails exactly where rustymimi's default
    does (frame 4096), behind the same renewal the real codec uses: the real
    codec costs ~0.15 s per frame on CI's CPU, 20 minutes for this test alone.
    The real codec's renewal is tested in test_mimi.py.
    """
    codec = RenewingCodec(lambda: InProcess(FakeCodec(max_frames=RUSTYMIMI_DEFAULT_FRAMES)))
    conv = mv.Conversation(talking_model, codec, load_tokenizer(tokenizer_path), sampler=mv.SamplerConfig(seed=0))
    question = np.tile(speech_like(10.0), 59)  # 590 s, then a 10 s tail: 7,500 frames
    rss: dict[int, int] = {}
    with WavWriter(tmp_path / "answer.wav", conv.sample_rate) as writer:
        def on_frame(out: np.ndarray) -> None:
            assert np.isfinite(out).all()
            writer.write(out)
            if writer.frames_written // conv.frame_size in (1000, TEN_MINUTES_FRAMES):
                rss[writer.frames_written // conv.frame_size] = rss_bytes()

        result = converse_offline(conv, question, tail_seconds=10.0, on_frame=on_frame)
    assert result.frames == TEN_MINUTES_FRAMES == conv.steps
    assert codec.encoder.renewals == 1 and codec.decoder.renewals == 2  # the decoder's first life is half
    growth = rss[TEN_MINUTES_FRAMES] - rss[1000]
    assert growth < MEMORY_GROWTH_BOUND, f"memory grew by {growth / 2**20:.1f} MiB over 6,500 frames"
    samples, _ = read_wav(tmp_path / "answer.wav")
    assert len(samples) == TEN_MINUTES_FRAMES * conv.frame_size


def test_file_mode_in_flight_gives_the_same_answer_as_one_frame_at_a_time(talking_model, mimi_path, tokenizer_path):
    """Up to 3 frames in the conversation (Mimi and the model side by side) or 1: the same audio and text,
    bit for bit, with the real codec and a picture switch."""
    question = speech_like(1.2)
    switches = [ImageSwitch(0.5, np.random.default_rng(3).standard_normal((16, 64)).astype(np.float32))]

    def answer(in_flight: int) -> tuple[np.ndarray, str]:
        conv = mv.Conversation(talking_model, mv.load_mimi(mimi_path), load_tokenizer(tokenizer_path),
                               sampler=mv.SamplerConfig(seed=4))
        frames: list[np.ndarray] = []
        try:
            result = converse_offline(conv, question, tail_seconds=0.4, image_switches=switches,
                                      on_frame=frames.append, in_flight=in_flight)
        finally:
            conv.close()
        return np.concatenate(frames), result.transcript

    serial, piped = answer(1), answer(3)
    np.testing.assert_array_equal(serial[0], piped[0])
    assert serial[1] == piped[1] and np.abs(serial[0]).max() > 0
