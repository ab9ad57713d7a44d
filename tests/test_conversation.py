"""The `Conversation` API: one frame in, one frame and its text out."""

from __future__ import annotations

import dataclasses
import gc
import threading

import numpy as np
import pytest

import moshivis_mlx as mv
from moshivis_mlx.model.text import load_tokenizer
from talk_support import FakeCodec, build_model, speech_like, talking_config

FRAME = 1920


def question(frames: int, seed: int = 0) -> list[np.ndarray]:
    audio = speech_like(frames * FRAME / 24000, seed=seed)
    return [audio[i * FRAME : (i + 1) * FRAME] for i in range(frames)]


def run(conv: mv.Conversation, frames: list[np.ndarray]) -> tuple[np.ndarray, list[str]]:
    outs, texts = zip(*(conv.step(f) for f in frames))
    return np.stack(outs), list(texts)


def features(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((16, 64)).astype(np.float32)


def test_a_model_for_another_codec_is_refused(tokenizer_path):
    fixture_sized = build_model(dataclasses.replace(talking_config(), audio_card=32))
    with pytest.raises(mv.IncompatibleModelError, match=r"32 codes per codebook.*codes 0\.\.2047"):
        mv.Conversation(fixture_sized, FakeCodec(), load_tokenizer(tokenizer_path))


def test_a_tokenizer_smaller_than_the_text_vocabulary_is_refused(tokenizer_path):
    wide_text = build_model(talking_config(text_card=100))
    with pytest.raises(mv.IncompatibleModelError, match="64 pieces.*100"):
        mv.Conversation(wide_text, FakeCodec(), load_tokenizer(tokenizer_path))


def test_step_contract(talking_model, tokenizer_path):
    conv = mv.Conversation(talking_model, FakeCodec(), load_tokenizer(tokenizer_path), sampler=mv.SamplerConfig(seed=0))
    first, text = conv.step(np.zeros(FRAME, np.float32))
    assert first.shape == (FRAME,) and first.dtype == np.float32 and not first.any() and text == ""
    out, text = conv.step(np.zeros((1, FRAME), np.float64))  # any float array of one frame
    assert out.shape == (FRAME,) and out.any() and isinstance(text, str)
    with pytest.raises(ValueError, match="1920 samples at 24000 Hz"):
        conv.step(np.zeros(FRAME // 2, np.float32))
    assert conv.steps == 2


def test_real_mimi_and_text_listeners(talking_model, mimi_path, tokenizer_path):
    heard: list[str] = []
    conv = mv.Conversation(talking_model, mimi_path, tokenizer_path,  # paths are loaded
                           image=features(1), sampler=mv.SamplerConfig(seed=3), on_text=heard.append)
    extra: list[str] = []
    conv.add_text_listener(extra.append)
    pcm, texts = run(conv, question(12))
    assert np.isfinite(pcm).all() and np.abs(pcm[1:]).max() > 0
    pieces = [t for t in texts if t]
    assert pieces and heard == pieces and extra == pieces  # random weights speak plenty of text
    assert conv.transcript == "".join(pieces)
    conv.remove_text_listener(extra.append)
    conv.step(np.zeros(FRAME, np.float32))
    assert len(extra) == len(pieces)


def test_same_seed_same_conversation_and_reset_replays_it(talking_model, tokenizer_path):
    frames = question(24)
    make = lambda: mv.Conversation(talking_model, FakeCodec(), load_tokenizer(tokenizer_path),
                                   sampler=mv.SamplerConfig(seed=11))
    a, b = make(), make()
    pcm_a, text_a = run(a, frames)
    pcm_b, text_b = run(b, frames)
    np.testing.assert_array_equal(pcm_a, pcm_b)
    assert text_a == text_b
    b.reset()
    assert b.transcript == "" and b.steps == 0
    pcm_c, text_c = run(b, frames)
    np.testing.assert_array_equal(pcm_a, pcm_c)
    assert text_a == text_c
    other = mv.Conversation(talking_model, FakeCodec(), load_tokenizer(tokenizer_path), sampler=mv.SamplerConfig(seed=12))
    assert not np.array_equal(run(other, frames)[0], pcm_a)


def test_set_image_mid_conversation(talking_model, tokenizer_path):
    frames = question(20)
    xa_start = talking_model.cfg.xa_start

    def talk(switch_at: int | None, image) -> np.ndarray:
        conv = mv.Conversation(talking_model, FakeCodec(), load_tokenizer(tokenizer_path), greedy=True)
        outs = []
        for i, frame in enumerate(frames):
            if i == switch_at:
                conv.set_image(image)
            outs.append(conv.step(frame)[0])
        return np.stack(outs)

    blind = talk(None, None)
    seeing = talk(8, features(2))
    assert 8 > xa_start
    np.testing.assert_array_equal(seeing[:9], blind[:9])  # the step's tokens come out one step later
    assert not np.array_equal(seeing[9:], blind[9:])
    np.testing.assert_array_equal(talk(8, None), blind)  # None: no picture at all


def test_usable_from_other_threads(talking_model, tokenizer_path):
    """Made in this thread, stepped in another, pictures switched from a third."""
    conv = mv.Conversation(talking_model, FakeCodec(), load_tokenizer(tokenizer_path), sampler=mv.SamplerConfig(seed=0))
    errors: list[BaseException] = []
    done = threading.Event()

    def talk():
        try:
            for frame in question(30):
                conv.step(frame)
        except BaseException as e:
            errors.append(e)
        finally:
            done.set()

    worker = threading.Thread(target=talk)
    worker.start()
    switches = 0
    while not done.is_set():
        conv.set_image(features(switches) if switches % 2 else None)
        switches += 1
    worker.join()
    assert not errors and conv.steps == 30 and switches > 0


def test_from_pretrained_with_local_files(talking_checkpoint, mimi_path, tokenizer_path):
    conv = mv.Conversation.from_pretrained(model=talking_checkpoint, mimi=mimi_path, tokenizer=tokenizer_path,
                                           dtype="float32", sampler=mv.SamplerConfig(seed=0))
    out, _ = conv.step(np.zeros(FRAME, np.float32))
    assert out.shape == (FRAME,)


def test_a_dropped_conversation_stops_its_thread(talking_model, tokenizer_path):
    conv = mv.Conversation(talking_model, FakeCodec(), load_tokenizer(tokenizer_path))
    conv.step(np.zeros(FRAME, np.float32))
    pipeline = conv._pipeline
    assert pipeline.threads_alive
    del conv
    gc.collect()
    assert not pipeline.threads_alive  # the finalizer joined every stage
    closed = mv.Conversation(talking_model, FakeCodec(), load_tokenizer(tokenizer_path))
    closed.close()
    with pytest.raises(RuntimeError, match="closed"):
        closed.step(np.zeros(FRAME, np.float32))
