"""Where the server listens and who may use it: loopback by default, the page's own origin only.

A page from another site may open a websocket to localhost (browsers allow
it), so the websocket checks that `Origin` is the page's own. On a loopback
address the `Host` header must name loopback too: otherwise a site whose
name resolves to 127.0.0.1 (DNS rebinding) would be its own "same origin".
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8998  # as Kyutai's servers
LOCALHOST = "localhost"
_SCHEMES = ("http", "https")  # https when a proxy terminates TLS in front of the server


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or a name that is localhost."""
    name = host.strip("[]").lower()
    if name == LOCALHOST or name.endswith("." + LOCALHOST):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def exposure_warnings(host: str) -> list[str]:
    """What a user binding beyond loopback must know."""
    if is_loopback(host):
        return []
    return [
        f"warning: listening on {host}, not only on this machine. Browsers give a page the microphone only on "
        "localhost or over https, so from another machine put an https proxy in front of this server.",
        "warning: anyone who can reach this port can talk to the model and hear its answers.",
    ]


def _hostname(host_header: str) -> str | None:
    try:
        return urlsplit(f"//{host_header}").hostname
    except ValueError:
        return None


def host_allowed(host_header: str | None, loopback_only: bool) -> bool:
    """A request's `Host` is acceptable (always, unless the server is loopback-only)."""
    if not loopback_only:
        return True
    name = _hostname(host_header or "")
    return name is not None and is_loopback(name)


def origin_allowed(origin: str | None, host_header: str | None, loopback_only: bool) -> bool:
    """The websocket's `Origin` is the page's own (same host and port), and the host is allowed."""
    if not origin or not host_header or not host_allowed(host_header, loopback_only):
        return False
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    return parts.scheme in _SCHEMES and parts.netloc.lower() == host_header.lower() and not parts.path.strip("/")
