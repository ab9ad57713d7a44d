"""The web page's server without a browser: protocol, who may connect, the session's pacing and drops.

The conversation runs the tiny random model with the instantaneous stand-in
codec (talk_support.FakeCodec); tests/test_web_browser.py drives the real page.
"""

from __future__ import annotations

import asyncio
import signal
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

import moshivis_mlx as mv
from moshivis_mlx.model.text import load_tokenizer
from moshivis_mlx.app.web import protocol
from moshivis_mlx.app.web.command import build_parser
from moshivis_mlx.app.web.origin import exposure_warnings, host_allowed, is_loopback, origin_allowed
from moshivis_mlx.app.web.session import SessionConfig, WebSession
from talk_support import FakeCodec, speech_like

FRAME = 1920
HANG_GUARD_SECONDS = 120  # only against a hang: no assertion depends on time


def png_bytes(color=(200, 30, 30), size=(40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "PNG")
    return out.getvalue()


def wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD_SECONDS
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.01)


# -- protocol ---------------------------------------------------------------------------


def test_audio_round_trips_as_pcm16():
    samples = np.array([0.0, 0.5, -0.5, 0.99997, -1.0, 1.5, -1.5], np.float32)
    message = protocol.decode(protocol.audio(samples))
    assert message.kind == protocol.Kind.AUDIO and len(message.payload) == 2 * len(samples)
    decoded = protocol.pcm16_to_float(message.payload)
    np.testing.assert_allclose(decoded[:5], samples[:5], atol=1 / 32768)
    assert decoded[5] == 32767 / 32768 and decoded[6] == -1.0  # clipped, not wrapped


def test_text_carries_its_gate_and_utf8():
    message = protocol.decode(protocol.text(" café ☕", 0.0234))
    assert message.kind == protocol.Kind.TEXT
    piece, gate = protocol.parse_text(message.payload)
    assert piece == " café ☕" and gate == pytest.approx(0.0234, rel=1e-6)


def test_json_messages_and_malformed_input():
    assert protocol.parse_json(protocol.decode(protocol.control("reset")).payload) == {"action": "reset"}
    status = protocol.decode(protocol.status("stats", lag=0.1))
    assert status.kind == protocol.Kind.STATUS and protocol.parse_json(status.payload) == {"event": "stats", "lag": 0.1}
    assert protocol.decode(protocol.image(b"abc")) == protocol.Message(protocol.Kind.IMAGE, b"abc")
    for bad in (b"", b"\x09abc"):
        with pytest.raises(protocol.ProtocolError):
            protocol.decode(bad)
    with pytest.raises(protocol.ProtocolError, match="whole 16-bit"):
        protocol.pcm16_to_float(b"\x00\x01\x02")
    with pytest.raises(protocol.ProtocolError):
        protocol.parse_json(b"[1]")


# -- who may connect ---------------------------------------------------------------------


def test_listens_on_loopback_by_default():
    args = build_parser().parse_args([])
    assert (args.host, args.port, args.no_browser) == ("127.0.0.1", 8998, False)
    assert is_loopback(args.host) and exposure_warnings(args.host) == []


def test_a_non_loopback_host_prints_both_warnings():
    assert is_loopback("localhost") and is_loopback("::1") and is_loopback("[::1]") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10") and not is_loopback("example.com")
    text = " ".join(exposure_warnings("0.0.0.0"))
    assert "localhost or over https" in text and "anyone who can reach this port" in text


@pytest.mark.parametrize("origin, host, loopback_only, allowed", [
    ("http://127.0.0.1:8998", "127.0.0.1:8998", True, True),
    ("http://localhost:8998", "localhost:8998", True, True),
    ("http://[::1]:8998", "[::1]:8998", True, True),
    ("http://evil.example:8998", "127.0.0.1:8998", True, False),  # another site's page
    ("http://127.0.0.1:9999", "127.0.0.1:8998", True, False),  # another port is another origin
    ("null", "127.0.0.1:8998", True, False),  # a file:// page or a sandboxed frame
    (None, "127.0.0.1:8998", True, False),  # no Origin: not a browser page
    ("http://evil.example:8998", "evil.example:8998", True, False),  # DNS rebinding onto loopback
    ("http://192.168.1.10:8998", "192.168.1.10:8998", False, True),  # --host 0.0.0.0, from the LAN
    ("http://evil.example:8998", "192.168.1.10:8998", False, False),
    ("http://127.0.0.1:8998/page", "127.0.0.1:8998", True, False),
])
def test_origin_check(origin, host, loopback_only, allowed):
    assert origin_allowed(origin, host, loopback_only) is allowed


def test_host_check_on_loopback():
    assert host_allowed("127.0.0.1:8998", True) and host_allowed("localhost", True)
    assert not host_allowed("evil.example:8998", True) and not host_allowed(None, True)
    assert host_allowed("evil.example:8998", False)


# -- the session: paced by the page's audio, bounded lag, pictures and resets in order ----


class Recorder:
    """The session's `send`: decoded messages, in order."""

    def __init__(self):
        self.messages: list[protocol.Message] = []
        self._lock = threading.Lock()

    def __call__(self, data: bytes) -> None:
        with self._lock:
            self.messages.append(protocol.decode(data))

    def of(self, kind: protocol.Kind) -> list[protocol.Message]:
        with self._lock:
            return [m for m in self.messages if m.kind == kind]

    def events(self) -> list[tuple[str, str]]:
        """("status", event) and ("error", code), in order."""
        with self._lock:
            return [("status" if m.kind == protocol.Kind.STATUS else "error",
                     protocol.parse_json(m.payload)["event" if m.kind == protocol.Kind.STATUS else "code"])
                    for m in self.messages if m.kind in (protocol.Kind.STATUS, protocol.Kind.ERROR)
                    and protocol.parse_json(m.payload).get("event") != "stats"]


@pytest.fixture
def conversation(talking_model, tokenizer_path):
    conv = mv.Conversation(talking_model, FakeCodec(), load_tokenizer(tokenizer_path), sampler=mv.SamplerConfig(seed=0))
    yield conv
    conv.close()


def frames(n: int, seed: int = 0) -> list[np.ndarray]:
    audio = speech_like(n * FRAME / 24000, seed=seed)
    return [audio[i * FRAME : (i + 1) * FRAME] for i in range(n)]


def test_one_step_per_frame_received_and_text_with_gates(conversation):
    sent = Recorder()
    session = WebSession(conversation, sent, SessionConfig(max_lag_seconds=10.0))
    session.start()
    try:
        wait_for(lambda: sent.events()[:1] == [("status", "ready")], "ready")
        session.request_image(png_bytes())
        audio = np.concatenate(frames(40))
        for chunk in np.array_split(audio, 57):  # blocks that are not whole frames
            session.push_audio(chunk)
        wait_for(lambda: len(sent.of(protocol.Kind.AUDIO)) == 40, "an answer per frame")
        assert session.stats.steps == 40 and session.stats.dropped_frames == 0
        assert all(len(m.payload) == 2 * FRAME for m in sent.of(protocol.Kind.AUDIO))
        texts = [protocol.parse_text(m.payload) for m in sent.of(protocol.Kind.TEXT)]
        assert texts and all(t for t, _ in texts)
        # the picture was on: once the cross-attention starts (step 16 here), gates are its own
        assert any(g > 0 for _, g in texts) and all(0 <= g <= 1 for _, g in texts)
        session.push_audio(np.zeros(FRAME - 1, np.float32))  # less than a frame: no step
        time.sleep(0.2)
        assert session.stats.steps == 40
    finally:
        session.stop()
    assert sent.events() == [("status", "ready"), ("status", "image")]


def test_a_slow_machine_drops_the_oldest_input_beyond_the_lag_bound(conversation):
    sent = Recorder()
    session = WebSession(conversation, sent, SessionConfig(max_lag_seconds=0.5))
    for frame in frames(20):  # 1.6 s arrives before the first step
        session.push_audio(frame)
    session.start()
    try:
        wait_for(lambda: session.stats.steps + session.stats.dropped_frames == 20, "all 20 frames used or dropped")
    finally:
        session.stop()
    # 1.6 s waiting, 0.5 s allowed: the 14 oldest frames go, 6 are answered
    assert (session.stats.dropped_frames, session.stats.steps) == (14, 6)
    assert session.stats.max_lag_seconds <= 0.5


def test_bad_and_oversized_pictures_are_refused_in_order_and_the_talk_goes_on(conversation):
    sent = Recorder()
    session = WebSession(conversation, sent, SessionConfig(max_image_bytes=10_000))
    session.start()
    try:
        session.request_image(b"this is not a picture")
        session.request_image(png_bytes(size=(2000, 2000)) + bytes(20_000))  # over the limit
        session.request_image(png_bytes())
        session.request_reset()
        for frame in frames(5):
            session.push_audio(frame)
        wait_for(lambda: session.stats.steps == 5, "five steps after the refusals")
    finally:
        session.stop()
    assert sent.events() == [("status", "ready"), ("error", "image"), ("error", "image"), ("status", "image"),
                             ("status", "reset")]
    refusals = [protocol.parse_json(m.payload)["message"] for m in sent.of(protocol.Kind.ERROR)]
    assert "cannot use this picture" in refusals[0] and "the limit is" in refusals[1]


# -- the server: one page at a time, its own origin only -----------------------------------


def test_server_serves_the_page_and_one_conversation_at_a_time(conversation):
    from aiohttp import WSMsgType
    from aiohttp.test_utils import TestClient, TestServer

    from moshivis_mlx.app.web.server import ServerConfig, WebServer

    async def scenario():
        server = WebServer(conversation, ServerConfig())
        async with TestClient(TestServer(server.app(), host="127.0.0.1")) as client:
            own = f"http://{client.host}:{client.port}"
            page = await client.get("/")
            assert page.status == 200 and 'id="transcript"' in await page.text()
            for path in ("/static/app.js", "/static/audio-worklet.js", "/static/style.css"):
                assert (await client.get(path)).status == 200
            assert (await client.get("/", headers={"Host": f"evil.example:{client.port}"})).status == 403
            refused = await client.get("/ws", headers={"Origin": "http://evil.example"})
            assert refused.status == 403

            first = await client.ws_connect("/ws", origin=own)
            ready = protocol.decode((await first.receive()).data)
            assert protocol.parse_json(ready.payload)["event"] == "ready"
            second = await client.ws_connect("/ws", origin=own)
            busy = protocol.decode((await second.receive()).data)
            assert busy.kind == protocol.Kind.ERROR and protocol.parse_json(busy.payload)["code"] == "busy"
            assert (await second.receive()).type in (WSMsgType.CLOSE, WSMsgType.CLOSED)

            await first.send_bytes(protocol.audio(frames(1)[0]))
            await first.send_str("hello")  # not binary: an error, and the conversation goes on
            await first.send_bytes(protocol.audio(frames(2)[1]))
            kinds = []
            while kinds.count(protocol.Kind.AUDIO) < 2:
                kinds.append(protocol.decode((await first.receive()).data).kind)
            assert protocol.Kind.ERROR in kinds
            await first.close()

            third = await client.ws_connect("/ws", origin=own)  # the first page left: free again
            assert protocol.parse_json(protocol.decode((await third.receive()).data).payload)["event"] == "ready"
            await third.close()

    asyncio.run(asyncio.wait_for(scenario(), HANG_GUARD_SECONDS))


# -- the command: Ctrl-C mid-conversation ---------------------------------------------------


def test_ctrl_c_ends_the_conversation_and_the_server_cleanly(talking_checkpoint, mimi_path, tokenizer_path):
    from aiohttp import ClientSession, WSMsgType

    from web_support import Server

    server = Server(["--model", str(talking_checkpoint), "--mimi", str(mimi_path), "--tokenizer", str(tokenizer_path)])
    try:
        async def talk_then_interrupt() -> int:
            async with ClientSession() as http:
                ws = await http.ws_connect(server.url + "ws", origin=server.url.rstrip("/"))
                kinds = []
                for frame in frames(4):
                    await ws.send_bytes(protocol.audio(frame))
                while kinds.count(protocol.Kind.AUDIO) < 4:
                    kinds.append(protocol.decode((await ws.receive()).data).kind)
                server.process.send_signal(signal.SIGINT)  # mid-conversation
                while (message := await ws.receive()).type not in (WSMsgType.CLOSE, WSMsgType.CLOSED):
                    pass
                return ws.close_code

        close_code = asyncio.run(asyncio.wait_for(talk_then_interrupt(), HANG_GUARD_SECONDS))
        assert server.process.wait(HANG_GUARD_SECONDS) == 0
    finally:
        if server.process.poll() is None:
            server.process.kill()
    assert close_code == 1001  # "going away": the server is shutting down
    server.wait_for_line("the conversation ended after .*: 4 steps")
    server.wait_for_line("^stopped$")
