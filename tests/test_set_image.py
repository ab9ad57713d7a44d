"""Switching the picture in the middle of a conversation, and turning vision off.

The independent reference is a teacher-forced, whole-sequence forward of the
temporal transformer in which each step cross-attends to the image that was
active at that step; its inputs are rebuilt from the stream's own greedy
outputs with the token conventions of the official code (fixtures/README.md).
"""

from __future__ import annotations


import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

import moshivis_mlx
from moshivis_mlx.model.siglip import SiglipVisionTower

from conftest import FIXTURE_A as FIXTURE
ATOL_F32 = 1e-4  # streaming vs whole-sequence float32: rounding only
ATOL_OFFICIAL = 1e-3  # against the official PyTorch logits (fixtures/README.md)
NUM_STEPS = 20
SWITCH_AT = 9  # well after xa_start = 3, so image 1 has shaped the history


@pytest.fixture(scope="module")
def model():
    return moshivis_mlx.load(FIXTURE, dtype="float32")


@pytest.fixture(scope="module")
def images(model, reference):
    first = model.embed_image(reference["image.pixels"])
    second_pixels = np.asarray(Image.fromarray(reference["image.pixels"]).transpose(Image.Transpose.ROTATE_90))
    second = model.embed_image(255 - second_pixels)
    return first, second


def run(stream, user_tokens: np.ndarray, steps: range, switch: dict | None = None):
    """Step the stream; `switch` maps a step index to the set_image arguments used before it."""
    text, audio = [], []
    for t in steps:
        if switch and t in switch:
            image, kwargs = switch[t]
            stream.set_image(image, **kwargs)
        out = stream.step(user_tokens[t])
        text.append(np.array(out.text_logits))
        audio.append(np.array(out.audio_logits))
    return np.stack(text), np.stack(audio)


def model_inputs(cfg, user_tokens: np.ndarray, text_logits: np.ndarray, audio_logits: np.ndarray) -> np.ndarray:
    """The 17 tokens each step embeds, rebuilt from greedy outputs (official conventions):
    a stream with delay d shows its initial token while t <= d; after that a
    generated stream shows what step t - 1 generated and a user stream shows
    the user's frame t - d."""
    text = text_logits.argmax(-1)
    audio = audio_logits.argmax(-1)  # (T, 8)
    num_gen = cfg.num_generated_codebooks
    steps = len(text)
    inputs = np.zeros((steps, 1 + cfg.num_audio_codebooks), np.int64)
    for t in range(steps):
        for s, d in enumerate(cfg.delays):
            if t <= d:
                inputs[t, s] = cfg.text_initial_token if s == 0 else cfg.audio_initial_token
            elif s == 0:
                inputs[t, s] = text[t - 1]
            elif s <= num_gen:
                inputs[t, s] = audio[t - 1, s - 1]
            else:
                inputs[t, s] = user_tokens[t - d, s - 1 - num_gen]
    return inputs


def teacher_forced_text_logits(model, inputs: np.ndarray, image_at: list) -> np.ndarray:
    """Whole-sequence forward where step t cross-attends to image_at[t] (None: no image)."""
    cfg, transformer = model.cfg, model.transformer
    x = model.embed_tokens(mx.array(inputs)[None])  # (1, T, dim)
    steps = mx.arange(len(inputs))
    delta = steps[:, None] - steps[None, :]
    mask = (delta >= 0) & (delta < cfg.context)
    distinct = {id(kv): kv for kv in image_at if kv is not None}.values()
    for layer in transformer.layers:
        x = x + layer.self_attn.forward_sequence(layer.norm1(x), mask)
        out = x
        for kv in distinct:
            active = mx.array([image is kv and t >= cfg.xa_start for t, image in enumerate(image_at)])
            out = mx.where(active[None, :, None], layer.cross_attend(x, transformer.cross_attention, kv), out)
        x = out + layer.gating(layer.norm2(out))
    return np.array(model.text_linear(model.out_norm(x))[0])


def test_teacher_forcing_reference_is_sound(model, reference, images):
    """The reference helpers reproduce the official run with an image."""
    user = reference["user_tokens"]
    steps = reference["with_image.text_logits"].shape[0]
    inputs = model_inputs(model.cfg, user, reference["with_image.text_logits"], reference["with_image.audio_logits"])
    np.testing.assert_array_equal(inputs, reference["with_image.model_input_tokens"])
    logits = teacher_forced_text_logits(model, inputs, [images[0]] * steps)
    np.testing.assert_allclose(logits, reference["with_image.text_logits"], rtol=0, atol=ATOL_OFFICIAL)


def test_switch_mid_conversation_uses_new_kv_and_keeps_history(model, reference, images):
    first, second = images
    user = reference["user_tokens"]
    stream = model.stream(image=first, greedy=True)
    text, audio = run(stream, user, range(NUM_STEPS), {SWITCH_AT: (second, {})})
    assert stream.image is second
    inputs = model_inputs(model.cfg, user, text, audio)
    image_at = [first] * SWITCH_AT + [second] * (NUM_STEPS - SWITCH_AT)
    np.testing.assert_allclose(text, teacher_forced_text_logits(model, inputs, image_at), rtol=0, atol=ATOL_F32)
    # The test can tell: keeping the first image, or forgetting the history, gives other logits.
    stayed = teacher_forced_text_logits(model, inputs, [first] * NUM_STEPS)
    assert np.abs(text[SWITCH_AT:] - stayed[SWITCH_AT:]).max() > 1e-2
    forgot = teacher_forced_text_logits(model, inputs[SWITCH_AT:], [second] * (NUM_STEPS - SWITCH_AT))
    assert np.abs(text[SWITCH_AT:] - forgot).max() > 1e-2


def test_switch_equals_new_image_from_start_given_same_history(model, reference, images):
    """Switching before the image is first used leaves the same history as having
    had the new image all along: every logit is identical."""
    first, second = images
    user = reference["user_tokens"]
    switched = run(model.stream(image=first, greedy=True), user, range(NUM_STEPS), {model.cfg.xa_start: (second, {})})
    from_start = run(model.stream(image=second, greedy=True), user, range(NUM_STEPS))
    np.testing.assert_array_equal(switched[0], from_start[0])
    np.testing.assert_array_equal(switched[1], from_start[1])


def test_switch_with_reset_starts_over(model, reference, images):
    first, second = images
    user = reference["user_tokens"]
    stream = model.stream(image=first, greedy=True)
    run(stream, user, range(SWITCH_AT))
    stream.set_image(second, reset=True)
    assert stream.offset == 0
    after = run(stream, user, range(SWITCH_AT, NUM_STEPS))
    fresh = run(model.stream(image=second, greedy=True), user[SWITCH_AT:], range(NUM_STEPS - SWITCH_AT))
    np.testing.assert_array_equal(after[0], fresh[0])


def test_vision_off_from_start_is_the_official_no_image_run(model, reference, images):
    user = reference["user_tokens"]
    steps = reference["no_image.text_logits"].shape[0]
    stream = model.stream(image=images[0], greedy=True)
    stream.set_image(None)
    text, audio = run(stream, user, range(steps))
    np.testing.assert_allclose(text, reference["no_image.text_logits"], rtol=0, atol=ATOL_OFFICIAL)
    np.testing.assert_allclose(audio, reference["no_image.audio_logits"], rtol=0, atol=ATOL_OFFICIAL)
    never = run(model.stream(image=None, greedy=True), user, range(steps))
    np.testing.assert_array_equal(text, never[0])  # exactly the no-image path
    np.testing.assert_array_equal(audio, never[1])


def test_vision_off_mid_conversation(model, reference, images):
    first, _ = images
    user = reference["user_tokens"]
    stream = model.stream(image=first, greedy=True)
    text, audio = run(stream, user, range(NUM_STEPS), {SWITCH_AT: (None, {})})
    assert stream.image is None
    inputs = model_inputs(model.cfg, user, text, audio)
    image_at = [first] * SWITCH_AT + [None] * (NUM_STEPS - SWITCH_AT)
    np.testing.assert_allclose(text, teacher_forced_text_logits(model, inputs, image_at), rtol=0, atol=ATOL_F32)
    stayed = teacher_forced_text_logits(model, inputs, [first] * NUM_STEPS)
    assert np.abs(text[SWITCH_AT:] - stayed[SWITCH_AT:]).max() > 1e-2


def test_every_kind_of_image_gives_the_same_kv(model, reference, tmp_path):
    pixels = reference["image.pixels"]
    path = tmp_path / "picture.png"
    Image.fromarray(pixels).save(path)
    expected = model.embed_image(pixels)
    for image in (path, str(path), path.read_bytes(), Image.fromarray(pixels), mx.array(pixels)):
        kv = model.stream(image=image).image
        np.testing.assert_array_equal(np.array(kv.keys), np.array(expected.keys))
        np.testing.assert_array_equal(np.array(kv.values), np.array(expected.values))


def test_kv_computed_once(model, reference, images, monkeypatch):
    calls = []
    original = SiglipVisionTower.__call__
    monkeypatch.setattr(SiglipVisionTower, "__call__", lambda self, x: calls.append(1) or original(self, x))
    kv = model.embed_image(reference["image.pixels"])
    assert len(calls) == 1
    stream = model.stream(image=kv, greedy=True)
    stream.set_image(images[1])
    stream.set_image(kv)
    run(stream, reference["user_tokens"], range(6))
    other = model.stream(image=kv)
    assert len(calls) == 1  # streams reuse the K/V; steps never touch the encoder
    assert stream.image is kv and other.image is kv


def test_only_kv_stays_alive_after_embedding(model):
    """The pixels, the encoder features and the projected embeddings are freed."""
    big = np.random.default_rng(0).integers(0, 256, (700, 500, 3), dtype=np.uint8)
    image_size = 4 * model.cfg.vision.image_size  # 16 x 16 grid: 256 tokens
    model.embed_image(big, image_size=image_size)  # warm up any one-time allocation
    mx.clear_cache()
    before = mx.get_active_memory()
    kv = model.embed_image(big, image_size=image_size)
    grown = mx.get_active_memory() - before
    kv_bytes = kv.keys.nbytes + kv.values.nbytes
    pixels_bytes = image_size * image_size * 3 * 4
    assert kv.num_tokens == (image_size // model.cfg.vision.patch_size) ** 2
    assert grown <= kv_bytes + 4096, f"{grown} bytes alive for {kv_bytes} bytes of K/V"
    assert pixels_bytes > kv_bytes / 2  # anything image-sized left over would show
