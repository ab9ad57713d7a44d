"""The pipelined conversation: push frames, receive answers; the same conversation as `step`, bit for bit."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import moshivis_mlx as mv
from moshivis_mlx.model.text import load_tokenizer
from talk_support import FakeCodec, speech_like

FRAME = 1920


def question(frames: int, seed: int = 0) -> list[np.ndarray]:
    audio = speech_like(frames * FRAME / 24000, seed=seed)
    return [audio[i * FRAME : (i + 1) * FRAME] for i in range(frames)]


def features(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((16, 64)).astype(np.float32)


def script(conv: mv.Conversation, frames, pipelined: bool, events: dict[int, tuple]) -> list[mv.FrameOutput]:
    """Talk through `frames`, applying `events[i]` (("image", x) or ("reset",)) before frame i."""
    outputs = []
    for i, frame in enumerate(frames):
        if i in events:
            kind, *arg = events[i]
            conv.set_image(arg[0]) if kind == "image" else conv.reset()
        if pipelined:
            conv.push(frame)
        else:
            pcm, text = conv.step(frame)
            outputs.append((pcm, text))
    if pipelined:
        outputs = [(o.pcm, o.text) for o in (conv.receive(timeout=60) for _ in frames)]
    return outputs


def conversation(model, codec, tokenizer_path, **kwargs) -> mv.Conversation:
    return mv.Conversation(model, codec, load_tokenizer(tokenizer_path), sampler=mv.SamplerConfig(seed=5), **kwargs)


def test_pipelined_equals_serial_with_real_mimi_pictures_and_reset(talking_model, mimi_path, tokenizer_path):
    frames = question(30)
    events = {6: ("image", features(1)), 14: ("reset",), 20: ("image", None), 24: ("image", features(2))}
    serial = conversation(talking_model, mv.load_mimi(mimi_path), tokenizer_path)
    piped = conversation(talking_model, mv.load_mimi(mimi_path), tokenizer_path)
    try:
        a = script(serial, frames, pipelined=False, events=events)
        b = script(piped, frames, pipelined=True, events=events)
    finally:
        serial.close()
        piped.close()
    assert len(a) == len(b) == len(frames)
    for i, ((pcm_a, text_a), (pcm_b, text_b)) in enumerate(zip(a, b)):
        np.testing.assert_array_equal(pcm_a, pcm_b, err_msg=f"frame {i}")
        assert text_a == text_b, i
    assert any(t for _, t in a) and np.abs(np.stack([p for p, _ in a])).max() > 0  # something was said
    # After the reset at frame 14 (which keeps the picture), the same input gets the same answer as in a
    # fresh conversation: the model, the text and both Mimi directions start over exactly.
    fresh = conversation(talking_model, mv.load_mimi(mimi_path), tokenizer_path, image=features(1))
    try:
        again = script(fresh, frames[14:20], pipelined=True, events={})
    finally:
        fresh.close()
    for (pcm_a, _), (pcm_b, _) in zip(a[14:20], again):
        np.testing.assert_array_equal(pcm_a, pcm_b)


def test_controls_apply_at_frame_boundaries(talking_model, tokenizer_path):
    conv = conversation(talking_model, FakeCodec(), tokenizer_path)
    for frame in question(5):
        conv.push(frame)
    applied = conv.set_image(features(3), wait=False)
    assert applied.result(timeout=60) >= 5  # after every frame pushed before the call
    outputs = [conv.receive(timeout=60) for _ in range(5)]
    assert [o.index for o in outputs] == list(range(5))
    assert all(o.latency >= 0 and set(o.stage_seconds) == {"encode", "model", "decode"} for o in outputs)
    conv.push(question(1)[0])
    conv.reset()  # waits for the frame before it
    assert conv.steps == 0 and conv.in_flight == 0  # answered, not received yet
    assert conv.receive(timeout=60).index == 5
    conv.close()


def test_a_picture_is_embedded_while_frames_keep_flowing(talking_model, tokenizer_path):
    conv = conversation(talking_model, FakeCodec(), tokenizer_path)
    started = threading.Event()
    release = threading.Event()
    real_embed = talking_model.embed_image

    def slow_embed(image, **kwargs):  # the image thread is held until frames went through
        started.set()
        assert release.wait(60)
        return real_embed(image, **kwargs)

    talking_model.embed_image = slow_embed
    try:
        applied = conv.set_image(features(4), wait=False)
        assert started.wait(60)
        answered = [conv.step(f) for f in question(6)]  # not held up by the picture
        assert len(answered) == 6 and not applied.done() and conv.preparing_image
        release.set()
        boundary = applied.result(timeout=60)
        assert boundary == 6 and not conv.preparing_image
    finally:
        talking_model.embed_image = real_embed
        release.set()
    bad = conv.set_image(np.zeros((3, 3, 7), np.uint8), wait=False)  # not an image: the conversation goes on
    with pytest.raises(Exception):
        bad.result(timeout=60)
    conv.step(question(1)[0])
    conv.close()


class FailingCodec(FakeCodec):
    def __init__(self, fail_at: int, direction: str):
        super().__init__()
        self.fail_at, self.direction, self.closed = fail_at, direction, False

    def encode(self, frame):
        if self.direction == "encode" and self.encoded == self.fail_at:
            raise OSError("microphone codec broke")
        return super().encode(frame)

    def decode(self, codes):
        if self.direction == "decode" and self.decoded == self.fail_at:
            raise OSError("speaker codec broke")
        return super().decode(codes)

    def close(self):
        self.closed = True


@pytest.mark.parametrize("direction", ["encode", "decode"])
def test_a_failing_stage_reaches_the_caller_with_its_cause(talking_model, tokenizer_path, direction):
    codec = FailingCodec(3, direction)
    conv = conversation(talking_model, codec, tokenizer_path)
    for frame in question(3 + (direction == "decode")):  # the decoder sees its first codes one frame later
        conv.step(frame)
    with pytest.raises(mv.StageError, match=f"{direction} stage failed") as failure:
        conv.step(question(1)[0])
    assert isinstance(failure.value.__cause__, OSError)
    with pytest.raises(mv.StageError):  # and at every later call, never a hang
        conv.push(question(1)[0])
    with pytest.raises(mv.StageError):
        conv.reset()
    conv.close()
    assert not conv._pipeline.threads_alive and codec.closed


def test_a_failing_frame_listener_stops_the_conversation(talking_model, tokenizer_path):
    def listener(output):
        raise KeyError("app bug")

    conv = conversation(talking_model, FakeCodec(), tokenizer_path, on_frame=listener)
    conv.push(question(1)[0])
    deadline = time.monotonic() + 60
    while conv.error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert isinstance(conv.error, KeyError)
    with pytest.raises(mv.StageError, match="app bug"):
        conv.push(question(1)[0])
    conv.close()


def test_a_closed_conversation_refuses_work_and_leaves_no_thread(talking_model, tokenizer_path):
    codec = FailingCodec(10**6, "encode")
    got: list[mv.FrameOutput] = []
    conv = conversation(talking_model, codec, tokenizer_path, on_frame=got.append)
    for frame in question(4):
        conv.push(frame)
    conv.close()  # finishes what was pushed
    assert [o.index for o in got] == [0, 1, 2, 3]
    assert not conv._pipeline.threads_alive and codec.closed
    for call in (lambda: conv.push(question(1)[0]), lambda: conv.step(question(1)[0]), conv.reset,
                 lambda: conv.set_image(None), lambda: conv.set_image(None, wait=False)):
        with pytest.raises(mv.ConversationClosed):
            call()
    conv.close()  # twice is fine


def test_with_on_frame_step_and_receive_refuse_instead_of_waiting_forever(talking_model, tokenizer_path):
    conv = conversation(talking_model, FakeCodec(), tokenizer_path, on_frame=lambda out: None)
    for call in (lambda: conv.step(question(1)[0]), lambda: conv.receive(timeout=1)):
        with pytest.raises(RuntimeError, match="on_frame"):
            call()
    assert conv.frames_pushed == 0  # step refused before pushing
    conv.close()


def test_step_and_push_are_not_mixed(talking_model, tokenizer_path):
    conv = conversation(talking_model, FakeCodec(), tokenizer_path)
    conv.push(question(1)[0])
    with pytest.raises(RuntimeError, match="cannot follow push"):
        conv.step(question(1)[0])
    conv.receive(timeout=60)
    conv.step(question(1)[0])
    conv.close()
