"""`python -m moshivis_mlx web`: talk with MoshiVis about a picture in a local web page.

  protocol.py  the websocket messages (a kind byte, then the payload)
  origin.py    loopback by default; websockets from the page's own origin only
  session.py   WebSession: the page's audio -> Conversation -> audio and text back
  server.py    aiohttp: the page's files and the websocket, one page at a time
  command.py   the `web` subcommand
  static/      the page (plain HTML, CSS and JavaScript: no build step, no CDN)

Importing this package imports nothing heavy; aiohttp is imported by server.py.
"""
