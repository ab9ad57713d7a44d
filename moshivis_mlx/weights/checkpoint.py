"""Reading safetensors files with errors a person can act on.

The header is validated before MLX sees the file, so a truncated download or
a file of another format is reported by name instead of failing deep inside
MLX.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import mlx.core as mx

SAFETENSORS_DTYPES = {"BOOL", "U8", "I8", "U16", "I16", "F16", "BF16", "U32", "I32", "F32", "U64", "I64", "F64"}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the file and the reason."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def read_header(path: str | Path) -> dict[str, dict]:
    """Tensor name -> {"dtype", "shape", "data_offsets"}, after checking the file is whole."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "no such file")
    if path.is_dir():
        raise CheckpointError(path, "is a directory, expected a .safetensors file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(path, f"not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > _MAX_HEADER_BYTES or header_len > size - 8:
            raise CheckpointError(
                path, "not a safetensors file, or truncated (the header length does not fit the file)"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(path, "not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    data_len = size - 8 - header_len
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(path, f"malformed safetensors entry for tensor {name!r}") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(path, f"tensor {name!r} has unsupported dtype {dtype}")
        if end > data_len:
            raise CheckpointError(
                path,
                f"truncated: tensor {name!r} ends at byte {end} of the data but the file holds "
                f"only {data_len} data bytes (re-download or re-convert it)",
            )
    return header


def load_safetensors(path: str | Path) -> dict[str, mx.array]:
    """All tensors of a validated safetensors file, lazily, in their stored dtype."""
    read_header(path)
    try:
        return mx.load(str(path), format="safetensors")
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(path, f"could not be read as safetensors ({e})") from None


_SAFETENSORS_NAMES = {
    mx.bool_: "BOOL",
    mx.uint8: "U8",
    mx.int8: "I8",
    mx.uint16: "U16",
    mx.int16: "I16",
    mx.float16: "F16",
    mx.bfloat16: "BF16",
    mx.uint32: "U32",
    mx.int32: "I32",
    mx.float32: "F32",
    mx.uint64: "U64",
    mx.int64: "I64",
}
_HEADER_ALIGNMENT = 8  # safetensors pads the header so tensor data starts aligned


def safetensors_header(tensors: dict[str, mx.array], metadata: dict[str, str] | None = None) -> bytes:
    """The header of a file holding `tensors` in sorted order; needs shapes and dtypes only."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in sorted(tensors):
        a = tensors[name]
        if a.dtype not in _SAFETENSORS_NAMES:
            raise ValueError(f"{name}: dtype {a.dtype} cannot be stored in safetensors")
        header[name] = {"dtype": _SAFETENSORS_NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % _HEADER_ALIGNMENT)
    return struct.pack("<Q", len(raw)) + raw


def _write_array(f, a: mx.array) -> None:
    f.write(memoryview(a))


def write_safetensors(
    path: str | Path,
    tensors: dict[str, mx.array],
    metadata: dict[str, str] | None = None,
    on_tensor=None,
) -> int:
    """Write lazily computed tensors one at a time; returns the file size.

    The header is written first from shapes and dtypes alone; then each tensor
    is evaluated, written and dropped, so memory holds one tensor (plus
    whatever its source shares with the tensors still to come), never the
    whole checkpoint. Consumes `tensors`. `on_tensor(name, nbytes)` is called
    after each one (progress). The caller makes the write atomic.
    """
    head = safetensors_header(tensors, metadata)
    with open(path, "wb") as f:
        f.write(head)
        for name in sorted(tensors):
            a = mx.contiguous(tensors.pop(name))
            mx.eval(a)
            _write_array(f, a)
            nbytes = a.nbytes
            del a
            if on_tensor is not None:
                on_tensor(name, nbytes)
        f.flush()
        os.fsync(f.fileno())
        return f.tell()
