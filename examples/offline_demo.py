"""Offline demo: a picture and a recorded question in, the spoken answer and its transcript out.

    python examples/offline_demo.py --image photo.jpg --question question.wav \
        --answer answer.wav --transcript answer.txt

Weights, Mimi and the tokenizer come from the Hugging Face Hub (kyutai/moshika-vis-mlx) unless
--model / --mimi / --tokenizer name local files. `--image` takes what `Conversation` takes:
a picture file, or a .npy array of precomputed SigLIP features.
"""

from __future__ import annotations

import argparse

import numpy as np

from moshivis_mlx.cpu.blas import use_optimized_blas

use_optimized_blas()  # Linux: route MLX's float32 matmuls to OpenBLAS, before MLX loads

import moshivis_mlx  # noqa: E402
from moshivis_mlx.audio.wav import WavWriter, read_wav_mono, write_text  # noqa: E402
from moshivis_mlx.session.offline import converse_offline  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", required=True)
    p.add_argument("--question", required=True, help="WAV file, any rate and format")
    p.add_argument("--answer", required=True, help="WAV file to write (24 kHz mono)")
    p.add_argument("--transcript", help="text file to write")
    p.add_argument("--seconds-to-answer", type=float, default=6.0, help="silence after the question")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model")
    p.add_argument("--mimi")
    p.add_argument("--tokenizer")
    p.add_argument("--dtype", default="auto")
    args = p.parse_args()

    image = np.load(args.image) if args.image.endswith(".npy") else args.image
    conversation = moshivis_mlx.Conversation.from_pretrained(
        model=args.model, mimi=args.mimi, tokenizer=args.tokenizer, dtype=args.dtype, image=image,
        sampler=moshivis_mlx.SamplerConfig(seed=args.seed),
    )
    question = read_wav_mono(args.question, conversation.sample_rate)
    with WavWriter(args.answer, conversation.sample_rate) as answer:
        result = converse_offline(conversation, question, tail_seconds=args.seconds_to_answer,
                                  on_frame=answer.write, progress=True)
    if args.transcript:
        write_text(args.transcript, result.transcript + "\n")
    print(result.transcript)
    print(f"{result.seconds:.1f} s of audio in {result.elapsed:.1f} s -> {args.answer}")


if __name__ == "__main__":
    main()
