"""One Mimi instance in a process of its own: `python -m moshivis_mlx.audio.codec_worker PATH CODEBOOKS MAX_SEQ_LEN`.

Why a process: building a `rustymimi.Tokenizer` holds the GIL for the whole
load (0.2-1.5 s), which would freeze every thread of a conversation, audio
callbacks included. In its own process an instance is built, fed and run
without ever touching the conversation's interpreter.

The protocol, over the child's stdin and stdout, is a stream of messages:
a 5-byte header (`<cI`: an operation letter, the payload's length in bytes)
and the payload.

    parent -> child   'E' float32 pcm      encode, answer with the codes
                      'D' uint32 codes     decode, answer with the pcm
                      'e' / 'd'            the same, no answer (a successor being fed)
                      'S' (empty)          answer once everything before is done
    child -> parent   'R' (empty)          the instance is built
                      'O' payload          the answer to 'E', 'D' or 'S' (int64 codes, float32 pcm)
                      'X' utf-8 text       an error; the child exits after it

A payload holds one frame or k whole frames, frame after frame: k * 1920
samples, or k * CODEBOOKS codes (the codebooks of the first frame, then
the second's...), and the answer holds k frames in the same layout.
rustymimi runs k frames in one call (`encode_step` on (1, 1, k * 1920),
`decode_step` on (1, CODEBOOKS, k)) for about half the CPU per frame at k = 5
(mimi.RenewingCoder feeds its successors so); the live path sends one.

'S' is answered in order, so the parent may send it after a feed without
waiting and read the answer later, when it likes: once it is there, the
child has done everything sent before it (a check that never blocks).

The child exits when its stdin closes, so it never outlives its parent.
Only numpy and rustymimi are imported here: no MLX, no model.
"""

from __future__ import annotations

import os
import struct
import sys

HEADER = struct.Struct("<cI")


def read_exactly(stream, size: int) -> bytes | None:
    """`size` bytes, or None at the end of the stream."""
    chunks, missing = [], size
    while missing:
        chunk = stream.read(missing)
        if not chunk:
            return None
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)


def write_message(stream, op: bytes, payload: bytes = b"") -> None:
    stream.write(HEADER.pack(op, len(payload)) + payload)
    stream.flush()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def serve(path: str, num_codebooks: int, max_seq_len: int, requests, replies) -> None:
    import numpy as np

    try:
        import rustymimi

        tokenizer = rustymimi.Tokenizer(path, num_codebooks=num_codebooks, max_seq_len=max_seq_len)
    except Exception as e:  # rustymimi raises ValueError with a Rust backtrace
        write_message(replies, b"X", f"not a usable Mimi checkpoint ({_first_line(e)})".encode())
        return
    write_message(replies, b"R")
    while (header := read_exactly(requests, HEADER.size)) is not None:
        op, size = HEADER.unpack(header)
        payload = read_exactly(requests, size) if size else b""
        if payload is None:
            return
        try:
            if op in b"Ee":
                pcm = np.frombuffer(payload, np.float32).reshape(1, 1, -1)
                codes = tokenizer.encode_step(pcm)  # (1, num_codebooks, k)
                result = np.ascontiguousarray(codes[0].T, np.int64).tobytes()  # frame after frame
            elif op in b"Dd":
                codes = np.frombuffer(payload, np.uint32).reshape(-1, num_codebooks)  # (k, num_codebooks)
                pcm = tokenizer.decode_step(np.ascontiguousarray(codes.T[None]))  # (1, 1, k * frame_size)
                result = pcm[0, 0].astype(np.float32).tobytes()
            elif op == b"S":
                result = b""
            else:
                raise ValueError(f"unknown operation {op!r}")
        except Exception as e:
            write_message(replies, b"X", _first_line(e).encode())
            return
        if op in b"EDS":
            write_message(replies, b"O", result)


def main() -> None:
    path, num_codebooks, max_seq_len = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    # The protocol owns the original stdout; anything a library prints goes to stderr.
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    serve(path, num_codebooks, max_seq_len, sys.stdin.buffer, replies)


if __name__ == "__main__":
    main()
