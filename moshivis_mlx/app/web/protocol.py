"""The web page's wire protocol: binary websocket messages, one kind byte first.

| kind | byte | direction      | payload after the kind byte                                       |
|------|------|----------------|-------------------------------------------------------------------|
| AUDIO   | 1 | both ways      | mono PCM, signed 16-bit little-endian, 24 kHz (any whole number of |
|         |   |                | samples; the page sends 80 ms blocks, the server answers per step) |
| TEXT    | 2 | server -> page | float32 little-endian gate (0..1: how much the picture shaped this |
|         |   |                | text, see `StepOutput.gate`), then the text piece in UTF-8         |
| IMAGE   | 3 | page -> server | an image file's bytes (JPEG, PNG, WebP...): the new picture        |
| STATUS  | 4 | server -> page | a UTF-8 JSON object (below)                                       |
| CONTROL | 5 | page -> server | a UTF-8 JSON object: {"action": "reset"}                          |
| ERROR   | 6 | server -> page | a UTF-8 JSON object: {"code": ..., "message": ...}                |

STATUS objects carry an "event":
- "ready": first message of a conversation, with "sample_rate", "frame_size"
  and "max_image_bytes"; the page sends its picture (if any) and then audio.
- "stats": every few steps, with "rtf" (compute time per second of audio),
  "lag" (seconds of heard audio not yet answered), "dropped" (input frames
  dropped to bound the lag) and "steps".
- "image": the oldest picture not yet answered is now the one the model sees.
- "reset": the conversation started over (the picture stays).
ERROR codes: "busy" (another page is talking; the socket closes), "image"
(the oldest picture not yet answered was refused; the conversation goes on),
"protocol" (a message the server does not understand), "internal".

Pictures are answered in the order they were sent, each by one "image"
status or one "image" error. The model is paced by the AUDIO it receives:
one step per 1920 samples, never by a server clock.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

PCM_SCALE = 32768.0  # int16 full scale
_GATE = struct.Struct("<f")


class Kind(IntEnum):
    AUDIO = 1
    TEXT = 2
    IMAGE = 3
    STATUS = 4
    CONTROL = 5
    ERROR = 6


class ProtocolError(ValueError):
    """A message that does not follow the protocol (the page is told, the conversation goes on)."""


@dataclass
class Message:
    kind: Kind
    payload: bytes


def decode(data: bytes) -> Message:
    """Split a received message into its kind and payload."""
    if not data:
        raise ProtocolError("empty message")
    try:
        kind = Kind(data[0])
    except ValueError:
        raise ProtocolError(f"unknown message kind {data[0]}") from None
    return Message(kind, bytes(data[1:]))


# -- audio ---------------------------------------------------------------------------


def pcm16_to_float(payload: bytes) -> np.ndarray:
    """AUDIO payload -> float32 samples in [-1, 1)."""
    if len(payload) % 2:
        raise ProtocolError("audio payload must hold whole 16-bit samples")
    return np.frombuffer(payload, "<i2").astype(np.float32) / np.float32(PCM_SCALE)


def audio(samples: np.ndarray) -> bytes:
    """float32 samples -> an AUDIO message (clipped to the int16 range)."""
    scaled = np.clip(np.round(np.asarray(samples, np.float32) * PCM_SCALE), -PCM_SCALE, PCM_SCALE - 1)
    return bytes([Kind.AUDIO]) + scaled.astype("<i2").tobytes()


# -- text, status, control, errors ---------------------------------------------------


def text(piece: str, gate: float) -> bytes:
    return bytes([Kind.TEXT]) + _GATE.pack(gate) + piece.encode("utf-8")


def parse_text(payload: bytes) -> tuple[str, float]:
    if len(payload) < _GATE.size:
        raise ProtocolError("text payload shorter than its gate")
    return payload[_GATE.size :].decode("utf-8"), _GATE.unpack_from(payload)[0]


def _json(kind: Kind, obj: dict) -> bytes:
    return bytes([kind]) + json.dumps(obj, separators=(",", ":")).encode("utf-8")


def status(event: str, **fields) -> bytes:
    return _json(Kind.STATUS, {"event": event, **fields})


def error(code: str, message: str) -> bytes:
    return _json(Kind.ERROR, {"code": code, "message": message})


def control(action: str) -> bytes:
    return _json(Kind.CONTROL, {"action": action})


def image(data: bytes) -> bytes:
    return bytes([Kind.IMAGE]) + data


def parse_json(payload: bytes) -> dict:
    """STATUS, CONTROL or ERROR payload -> its object."""
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"not a JSON object: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("not a JSON object")
    return obj
