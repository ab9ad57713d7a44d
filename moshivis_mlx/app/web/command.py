"""`python -m moshivis_mlx web`: load the model, then serve the page until Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import sys
import webbrowser
from pathlib import Path

from .origin import DEFAULT_HOST, DEFAULT_PORT, exposure_warnings
from .session import DEFAULT_MAX_IMAGE_BYTES, SessionConfig

_INTERRUPTED_EXIT = 130

DESCRIPTION = """\
Talk with MoshiVis about a picture in your browser: a local page with the
microphone (with the browser's echo cancellation), the spoken answer, the
transcript and the picture, which you can drop, choose or take with the camera.

  python -m moshivis_mlx web            # then open the address it prints
"""


def build_parser() -> argparse.ArgumentParser:
    from ..cli import add_model_arguments

    p = argparse.ArgumentParser(prog="python -m moshivis_mlx web", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default {DEFAULT_HOST}: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"(default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--no-browser", action="store_true", help="do not open the page in the default browser")
    p.add_argument("--max-lag", type=float, default=0.5, metavar="SECONDS",
                   help="drop input beyond this delay when the machine is slower than real time (default 0.5)")
    p.add_argument("--max-image-mb", type=float, default=DEFAULT_MAX_IMAGE_BYTES / 2**20, metavar="MB",
                   help="refuse larger pictures (default %(default)g)")
    add_model_arguments(p)
    p.add_argument("--debug-step-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--debug-image-delay", type=float, default=0.0, help=argparse.SUPPRESS)  # load_conversation reads it
    return p


def main(argv: list[str] | None = None) -> int:
    from ..cli import _KNOWN_ERRORS, _release_mlx

    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except _KNOWN_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # while loading
        print("interrupted", file=sys.stderr)
        return _INTERRUPTED_EXIT
    finally:
        _release_mlx()


def _run(args) -> int:
    from ..cli import UsageError, load_conversation

    try:
        from .server import ServerConfig, WebServer, serve
    except ImportError as e:
        raise UsageError(f"the web page needs aiohttp (pip install aiohttp): {e}") from None
    for flag, value in (("--model", args.model), ("--mimi", args.mimi), ("--tokenizer", args.tokenizer)):
        if value is not None and not Path(value).expanduser().exists():
            raise UsageError(f"{flag} {value}: no such file or directory")
    if not 0 <= args.port < 2**16:
        raise UsageError(f"--port {args.port}: not a port number")
    session = SessionConfig(max_lag_seconds=args.max_lag, max_image_bytes=int(args.max_image_mb * 2**20),
                            step_delay=args.debug_step_delay)
    if session.max_lag_seconds < 0.08 or session.max_image_bytes <= 0:
        raise UsageError("--max-lag must be at least one frame (0.08 s) and --max-image-mb above 0")
    for warning in exposure_warnings(args.host):
        print(warning, file=sys.stderr)
    conversation = load_conversation(args, [])
    try:
        from .session import warm_up

        warm_up(conversation)
        server = WebServer(conversation, ServerConfig(host=args.host, port=args.port, session=session))

        def on_listening(url: str) -> None:
            print(f"open {url} to talk about a picture (Ctrl-C to stop)", file=sys.stderr, flush=True)
            if not args.no_browser:
                webbrowser.open(url)

        try:
            asyncio.run(serve(server, on_listening))
        except OSError as e:  # the port is taken, the address is not this machine's
            raise UsageError(f"cannot listen on {args.host}:{args.port}: {e}") from None
    finally:
        conversation.close()
    print("stopped", file=sys.stderr)
    return 0
