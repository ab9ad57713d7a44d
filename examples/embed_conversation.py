"""Embedding MoshiVis in an application with the `Conversation` API.

An app owns its audio: here a thread plays the part of a microphone callback, pushing 80 ms
frames (1920 float32 samples at 24 kHz) into the conversation as they come; `push` returns at
once, and the answers arrive in order through `on_frame` (an app would queue them for its
speaker). Mimi and the model work side by side meanwhile. Text arrives through a listener;
the picture changes halfway through, without pausing the conversation.

    python examples/embed_conversation.py --image cat.jpg --image2 dog.jpg --seconds 10
"""

from __future__ import annotations

import argparse
import queue
import threading

import numpy as np

from moshivis_mlx.cpu.blas import use_optimized_blas

use_optimized_blas()  # Linux: route MLX's float32 matmuls to OpenBLAS, before MLX loads

import moshivis_mlx  # noqa: E402

FRAME = 1920  # 80 ms at 24 kHz


def fake_microphone(conversation: "moshivis_mlx.Conversation", seconds: float, on_half: "callable") -> None:
    """Stands in for a real audio callback: a hum at 24 kHz, pushed frame by frame."""
    t = np.arange(int(seconds * 24000)) / 24000
    audio = (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    starts = range(0, len(audio) - FRAME + 1, FRAME)
    for i, start in enumerate(starts):
        if i == len(starts) // 2:
            on_half()
        conversation.push(audio[start : start + FRAME])  # returns at once


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

    speaker: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()  # an app's playback buffer
    conversation = moshivis_mlx.Conversation.from_pretrained(
        model=args.model, mimi=args.mimi, tokenizer=args.tokenizer, dtype=args.dtype,
        image=load_image(args.image), sampler=moshivis_mlx.SamplerConfig(seed=0),
        on_frame=lambda out: speaker.put(out.pcm),  # a FrameOutput: pcm, text, index, latency
    )
    conversation.add_text_listener(lambda piece: print(piece, end="", flush=True))

    def switch_picture() -> None:  # embedded on the conversation's image thread; frames keep flowing
        conversation.set_image(load_image(args.image2), wait=False)

    microphone = threading.Thread(target=fake_microphone, args=(conversation, args.seconds, switch_picture))
    microphone.start()
    microphone.join()
    conversation.close()  # answers every frame pushed, then stops the conversation's threads
    answered = speaker.qsize()
    print(f"\n{answered} frames answered ({answered * FRAME / 24000:.1f} s); transcript:")
    print(conversation.transcript)


if __name__ == "__main__":
    main()
