"""The HTTP side: the page's files and one websocket, served by aiohttp.

aiohttp gives HTTP, static files and websockets in one maintained package with
wheels for macOS arm64 and Linux on every Python we support; the standard
library has no websocket server. One page talks at a time: a second one is
told the model is busy. The worker thread's messages reach the websocket
through the event loop (`call_soon_threadsafe`), never from the thread itself.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from aiohttp import WSCloseCode, WSMsgType, web

from . import protocol
from .origin import DEFAULT_HOST, DEFAULT_PORT, host_allowed, is_loopback, origin_allowed
from .session import SessionConfig, WebSession

STATIC = Path(__file__).resolve().parent / "static"
INDEX = "index.html"
WEBSOCKET_PATH = "/ws"


@dataclass
class ServerConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    session: SessionConfig = field(default_factory=SessionConfig)


class WebServer:
    """Serves one `Conversation` to one page at a time."""

    def __init__(self, conversation, config: ServerConfig | None = None, log: Callable[[str], None] | None = None):
        self.conversation = conversation
        self.config = config or ServerConfig()
        self.log = log or _log_to_stderr
        self._loopback_only = is_loopback(self.config.host)
        self._active: web.WebSocketResponse | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._check_host])
        app.router.add_get("/", self._index)
        app.router.add_get(WEBSOCKET_PATH, self._websocket)
        app.router.add_static("/static/", STATIC)
        app.on_shutdown.append(self._close_active)
        return app

    # -- HTTP ---------------------------------------------------------------------

    @web.middleware
    async def _check_host(self, request: web.Request, handler):
        if not host_allowed(request.headers.get("Host"), self._loopback_only):
            raise web.HTTPForbidden(text="this server answers only to localhost")
        return await handler(request)

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / INDEX, headers={"Cache-Control": "no-store"})

    # -- the conversation -----------------------------------------------------------

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        if not origin_allowed(request.headers.get("Origin"), request.headers.get("Host"), self._loopback_only):
            raise web.HTTPForbidden(text="websocket connections are accepted from this server's own page only")
        ws = web.WebSocketResponse(max_msg_size=2 * self.config.session.max_image_bytes)
        await ws.prepare(request)
        if self._active is not None:
            await ws.send_bytes(protocol.error("busy", "the model is busy: another page is talking with it"))
            await ws.close()
            self.log("a second page was told the model is busy")
            return ws
        self._active = ws
        self.log("a page started a conversation")
        try:
            session = await self._converse(ws)
        finally:
            self._active = None
        self.log(summary(session))
        return ws

    async def _converse(self, ws: web.WebSocketResponse) -> WebSession:
        loop = asyncio.get_running_loop()
        outbox: asyncio.Queue[bytes | None] = asyncio.Queue()

        def send(message: bytes | None) -> None:  # from the worker thread
            try:
                loop.call_soon_threadsafe(outbox.put_nowait, message)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        session = WebSession(self.conversation, send, self.config.session)
        writer = asyncio.create_task(_write(ws, outbox, session))
        session.start()
        started = time.perf_counter()
        try:
            async for message in ws:
                if message.type == WSMsgType.BINARY:
                    _receive(session, message.data, send)
                elif message.type == WSMsgType.TEXT:
                    send(protocol.error("protocol", "messages are binary, a kind byte first"))
        finally:
            await loop.run_in_executor(None, session.stop)  # it finishes the step under way
            send(None)
            await writer
            await ws.close()
            session.stats.seconds = time.perf_counter() - started
        return session

    async def _close_active(self, app: web.Application) -> None:
        if self._active is not None:
            await self._active.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")


def summary(session: WebSession) -> str:
    stats = session.stats
    text = (f"the conversation ended after {stats.seconds:.1f} s: {stats.steps} steps, "
            f"{stats.dropped_frames} input frames dropped to bound the lag (max lag {stats.max_lag_seconds:.2f} s), "
            f"{stats.image_switches} pictures")
    return text + (f"; it failed: {session.error!r}" if session.error is not None else "")


def _log_to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _receive(session: WebSession, data: bytes, send: Callable[[bytes], None]) -> None:
    try:
        message = protocol.decode(data)
        if message.kind == protocol.Kind.AUDIO:
            session.push_audio(protocol.pcm16_to_float(message.payload))
        elif message.kind == protocol.Kind.IMAGE:
            session.request_image(message.payload)
        elif message.kind == protocol.Kind.CONTROL:
            action = protocol.parse_json(message.payload).get("action")
            if action != "reset":
                raise protocol.ProtocolError(f"unknown control action {action!r}")
            session.request_reset()
        else:
            raise protocol.ProtocolError(f"the page does not send {message.kind.name} messages")
    except protocol.ProtocolError as e:
        send(protocol.error("protocol", str(e)))


async def _write(ws: web.WebSocketResponse, outbox: asyncio.Queue, session: WebSession) -> None:
    """The worker's messages, in order, until None; the socket closes if the conversation failed."""
    while (message := await outbox.get()) is not None:
        try:
            await ws.send_bytes(message)
        except ConnectionError:  # the page left; the reader's end closes the session
            continue
        if session.error is not None and outbox.empty():
            await ws.close(code=WSCloseCode.INTERNAL_ERROR)


async def serve(server: WebServer, on_listening: Callable[[str], None]) -> None:
    """Run until SIGINT or SIGTERM, then close the page's connection and stop cleanly."""
    runner = web.AppRunner(server.app(), handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, server.config.host, server.config.port)
        await site.start()
        port = runner.addresses[0][1]
        on_listening(page_url(server.config.host, port))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
    finally:
        await runner.cleanup()


def page_url(host: str, port: int) -> str:
    """The address to open: loopback by name where bound to every address."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/"
