"""Audio: Mimi, the codec between sound and the model's codes, and the sound around it.

  mimi.py          Mimi through `rustymimi`, each instance in a process of its own (codec_worker.py)
  wav.py           WAV files in and out
  resample.py      sample-rate conversion, for whole files and live audio
  framing.py       audio waiting to become whole 80 ms frames, under a lag bound
  devices.py       sound devices through `sounddevice`
  echo.py          acoustic echo cancellation, so the model can be heard through loudspeakers

Nothing here imports MLX.
"""
