"""Embedding MoshiVis in an application with the `Conversation` API.

An app owns its audio: here a thread plays the part of a microphone, handing 80 ms frames
(1920 float32 samples at 24 kHz) to a worker that steps the conversation and collects the
answer. Text arrives through a listener; the picture changes halfway through.

    python examples/embed_conversation.py --image cat.jpg --image2 dog.jpg --seconds 10
"""

from __future__ import annotations

import argparse
import queue
import threading

import numpy as np

from moshivis_mlx.blas import use_optimized_blas

use_optimized_blas()  # Linux: route MLX's float32 matmuls to OpenBLAS, before MLX loads

import moshivis_mlx  # noqa: E402

FRAME = 1920  # 80 ms at 24 kHz


def fake_microphone(frames: "queue.Queue[np.ndarray | None]", seconds: float) -> None:
    """Stands in for a real audio callback: a hum at 24 kHz, frame by frame, then None."""
    t = np.arange(int(seconds * 24000)) / 24000
    audio = (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    for start in range(0, len(audio) - FRAME + 1, FRAME):
        frames.put(audio[start : start + FRAME])
    frames.put(None)


def load_image(path: str):
    return np.load(path) if path.endswith(".npy") else path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", required=True)
    p.add_argument("--image2", required=True, help="switched to halfway")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--model")
    p.add_argument("--mimi")
    p.add_argument("--tokenizer")
    p.add_argument("--dtype", default="auto")
    args = p.parse_args()

    conversation = moshivis_mlx.Conversation.from_pretrained(
        model=args.model, mimi=args.mimi, tokenizer=args.tokenizer, dtype=args.dtype,
        image=load_image(args.image), sampler=moshivis_mlx.SamplerConfig(seed=0),
    )
    conversation.add_text_listener(lambda piece: print(piece, end="", flush=True))

    frames: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=8)  # bounded, like a real audio path
    answer: list[np.ndarray] = []
    total = int(args.seconds * 24000) // FRAME

    def worker() -> None:  # any thread may drive the conversation
        while (frame := frames.get()) is not None:
            pcm, _text = conversation.step(frame)
            answer.append(pcm)  # an app would queue this for its speaker
            if len(answer) == total // 2:
                conversation.set_image(load_image(args.image2))

    threads = [threading.Thread(target=fake_microphone, args=(frames, args.seconds)), threading.Thread(target=worker)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(f"\n{len(answer)} frames answered ({len(answer) * FRAME / 24000:.1f} s); transcript:")
    print(conversation.transcript)
    conversation.reset()  # ready for the next person


if __name__ == "__main__":
    main()
