"""The web page in a real browser: Debian's chromium driven by playwright.

`python -m moshivis_mlx web` runs as a user starts it (the tiny random model,
a random full-size Mimi through rustymimi); Chromium's fake devices are the
microphone (a WAV made here) and the camera (its test pattern). Waits have a
generous limit only against hangs: nothing asserts how fast anything is.

Needs `chromium` (apt) and `playwright` (pip; never `playwright install`: it
downloads a browser). Without them these tests skip, except under CI=true.
MOSHIVIS_MLX_SCREENSHOT=path saves a screenshot of the page mid-conversation.
"""

from __future__ import annotations

import io
import os
import wave
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from talk_support import speech_like
from web_support import HANG_GUARD_SECONDS, Server

CHROMIUM = Path("/usr/bin/chromium")
HANG_GUARD_MS = HANG_GUARD_SECONDS * 1000
MIC_RATE = 48000
MIC_SECONDS = 4.0  # Chromium loops the file
SCREENSHOT_ENV = "MOSHIVIS_MLX_SCREENSHOT"


def require_browser():
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the Python package playwright (pip install playwright)")
    if not CHROMIUM.exists():
        missing.append(f"Debian's chromium at {CHROMIUM} (apt-get install chromium)")
    if missing:
        message = "browser tests need " + " and ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; .ci/run installs them")
        pytest.skip(message)


def picture(sky: tuple[int, int, int], size=(480, 320)) -> dict:
    """A small drawn scene (a house under the sun) as a PNG file for `set_input_files`."""
    from PIL import ImageDraw

    w, h = size
    image = Image.new("RGB", size, sky)
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, int(h * 0.7), w, h], fill=(70, 140, 60))  # grass
    draw.ellipse([int(w * 0.75), 20, int(w * 0.75) + 60, 80], fill=(250, 210, 60))  # sun
    left, top = int(w * 0.2), int(h * 0.42)
    draw.rectangle([left, top, left + 140, int(h * 0.75)], fill=(200, 70, 50))  # house
    draw.polygon([(left - 15, top), (left + 70, top - 70), (left + 155, top)], fill=(110, 60, 40))  # roof
    draw.rectangle([left + 55, top + 50, left + 85, int(h * 0.75)], fill=(90, 50, 30))  # door
    out = io.BytesIO()
    image.save(out, "PNG")
    return {"name": f"scene-{sky[0]}.png", "mimeType": "image/png", "buffer": out.getvalue()}


@pytest.fixture(scope="module")
def server(talking_checkpoint, mimi_path, tokenizer_path):
    require_browser()
    server = Server(["--model", str(talking_checkpoint), "--mimi", str(mimi_path),
                     "--tokenizer", str(tokenizer_path), "--seed", "0"])
    yield server
    if server.process.poll() is None:
        server.interrupt()


@pytest.fixture(scope="module")
def browser(server, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    mic = tmp_path_factory.mktemp("mic") / "question.wav"
    with wave.open(str(mic), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(MIC_RATE)
        w.writeframes((speech_like(MIC_SECONDS, rate=MIC_RATE) * 32767).astype("<i2").tobytes())
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={mic}",
        ])
        yield browser
        browser.close()


@contextmanager
def page_of(browser, server, query: str = "", *, once_free: bool = True):
    """A fresh page (once the server is free, unless told otherwise); on leaving, no page
    errors or console errors may have happened."""
    if once_free:
        server.wait_until_free()
    context = browser.new_context(viewport={"width": 1100, "height": 640}, accept_downloads=True)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.goto(server.url + query)
    try:
        yield page
        assert problems == []
    finally:
        context.close()


def wait(page, condition: str) -> None:
    page.wait_for_function(f"() => {condition}", timeout=HANG_GUARD_MS)


def state(page, expression: str):
    return page.evaluate(f"() => window.moshivis.{expression}")


def test_talk_switch_picture_refuse_a_bad_one_reset_and_download(browser, server, tmp_path):
    with page_of(browser, server) as page:
        page.set_input_files("#image", picture((150, 190, 230)))  # before starting: sent when it starts
        page.wait_for_selector("#picture", state="visible", timeout=HANG_GUARD_MS)
        page.click("#start")
        wait(page, "window.moshivis.pictures === 1 && window.moshivis.pieces >= 3")
        wait(page, "window.moshivis.player.received >= 5")  # the model's audio reached the player
        # Read together: more text may arrive between two separate reads.
        spans, pieces = page.evaluate(
            "() => [document.querySelectorAll('#transcript span').length, window.moshivis.pieces]"
        )
        assert spans == pieces
        gates = page.eval_on_selector_all("#transcript span", "spans => spans.map(s => Number(s.dataset.gate))")
        assert all(0 <= g <= 1 for g in gates) and any(g > 0 for g in gates)  # the picture is on

        first_src = page.get_attribute("#picture", "src")
        page.set_input_files("#image", {"name": "bad.png", "mimeType": "image/png", "buffer": b"not a picture"})
        wait(page, "document.getElementById('message').textContent.startsWith('Picture refused')")
        assert page.get_attribute("#picture", "src") == first_src

        page.set_input_files("#image", picture((250, 170, 120)))  # mid-conversation
        wait(page, "window.moshivis.pictures === 2")
        assert page.get_attribute("#picture", "src") != first_src
        pieces = state(page, "pieces")
        wait(page, f"window.moshivis.pieces >= {pieces + 3}")  # the conversation goes on
        if os.environ.get(SCREENSHOT_ENV):  # for the README: a few lines of transcript first
            wait(page, f"window.moshivis.pieces >= {pieces + 25}")
            page.screenshot(path=os.environ[SCREENSHOT_ENV])

        page.click("#reset")
        wait(page, "window.moshivis.resets === 1")
        wait(page, "window.moshivis.pieces >= window.moshivis.piecesAtReset + 2")
        spans, pieces = page.evaluate("() => [document.querySelectorAll('#transcript span').length, "
                                      "window.moshivis.pieces - window.moshivis.piecesAtReset]")
        assert spans == pieces

        page.click("#start")  # stop
        wait(page, "!window.moshivis.ready")
        page.click("summary")
        with page.expect_download() as download:
            page.click("#download-transcript")
        assert download.value.path().read_text() == page.inner_text("#transcript") + "\n"
        with page.expect_download() as download:
            page.click("#download-recording")
        with wave.open(str(download.value.path())) as w:
            assert (w.getnchannels(), w.getframerate(), w.getsampwidth()) == (2, 24000, 2)
            both = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, 2)
        assert len(both) >= 10 * 1920 and np.abs(both[:, 0]).max() > 1000 and both[:, 1].any()
    assert server.process.poll() is None


def test_a_camera_still_becomes_the_picture(browser, server):
    with page_of(browser, server) as page:
        page.click("#start")
        wait(page, "window.moshivis.ready")
        page.click("#camera")
        wait(page, "document.getElementById('camera-preview').videoWidth > 0")
        page.click("#camera")
        wait(page, "window.moshivis.pictures === 1")
        size = page.evaluate("() => [document.getElementById('picture').naturalWidth, "
                             "document.getElementById('camera-preview').hidden]")
        assert size[0] > 0 and size[1] is True
        pieces = state(page, "pieces")
        wait(page, f"window.moshivis.pieces >= {pieces + 2}")
        page.click("#start")


def test_a_second_page_is_told_the_model_is_busy(browser, server):
    with page_of(browser, server) as first:
        first.click("#start")
        wait(first, "window.moshivis.ready")
        with page_of(browser, server, once_free=False) as second:
            second.click("#start")
            wait(second, "window.moshivis.errors.some(e => e.code === 'busy')")
            assert "busy" in second.inner_text("#message") and second.inner_text("#start") == "Start"
        frames = state(first, "receivedFrames")
        wait(first, f"window.moshivis.receivedFrames > {frames + 3}")  # the first page talks on
        first.click("#start")


def test_at_the_device_rate_as_firefox_must(browser, server):
    """`?resample` takes Firefox's way: the AudioContext at the device's rate, the worklet resamples."""
    with page_of(browser, server, "?resample") as page:
        page.click("#start")
        wait(page, "window.moshivis.pieces >= 2 && window.moshivis.player.received >= 5")
        assert state(page, "contextRate") != 24000
        page.click("#start")


def test_the_worklet_resampler_keeps_a_tone_and_removes_aliases(browser, server):
    with page_of(browser, server) as page:
        result = page.evaluate("""async () => {
            const source = await (await fetch('/static/audio-worklet.js')).text();
            const Resampler = new Function('AudioWorkletProcessor', 'registerProcessor', 'sampleRate',
                source + '; return Resampler;')(class {}, () => {}, 48000);
            const tone = (hz, rate, seconds) => Float32Array.from({length: rate * seconds}, (_, i) => Math.sin(2 * Math.PI * hz * i / rate));
            const run = (from, to, input) => {
                const r = new Resampler(from, to);
                const out = [];
                for (let i = 0; i < input.length; i += 128) out.push(...r.process(input.subarray(i, i + 128)));
                return out;
            };
            return {down: run(48000, 24000, tone(440, 48000, 1)), alias: run(48000, 24000, tone(15000, 48000, 1)),
                    up: run(24000, 44100, tone(440, 24000, 1))};
        }""")
    for name, rate in (("down", 24000), ("up", 44100)):
        out = np.array(result[name])
        assert abs(len(out) - rate) <= 64  # one second in, one second out
        steady = out[rate // 10 : -rate // 10]
        spectrum = np.abs(np.fft.rfft(steady * np.hanning(len(steady))))
        assert abs(np.argmax(spectrum) * rate / len(steady) - 440) < 5
        assert 0.97 < np.sqrt(2 * np.mean(steady**2)) < 1.03
    # 15 kHz cannot exist at 24 kHz: it must be filtered out, not folded to 9 kHz
    assert np.sqrt(np.mean(np.array(result["alias"][2400:-2400]) ** 2)) < 0.01
