"""The applications, each over a `Conversation`.

  cli.py      `python -m moshivis_mlx`: file mode, or live mode (live.py, console.py)
  live.py     microphone -> MoshiVis -> speaker, in real time
  console.py  the terminal side of live mode: transcript, status line, typed image paths
  doctor.py   `python -m moshivis_mlx doctor`: what this machine will do
  web/        `python -m moshivis_mlx web`: a local web page and its server
"""
