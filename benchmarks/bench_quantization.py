"""What each lever of the 4-bit policy costs in accuracy, against what it saves in bytes.

    python benchmarks/bench_quantization.py [--dtype float32|bfloat16] [--json]

For every setup of `bench_bytes.setups()` (the levers one at a time, then the
default policies): the bytes a released-size step reads (image on, full
window), and on fixture A, fed the official tokens (teacher forcing, 32 steps
with a 24-step window, so the window wraps):
  * the max |logit error| of text and audio against the official float32
    outputs, and against the same weights unquantized (same compute dtype);
  * greedy agreement: how often the argmax of each step's text and audio
    logits is the unquantized model's, and the official (greedy) run's token.
The runs with and without the image are both counted (the max over both).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402

import moshivis_mlx as mv  # noqa: E402
from bench_bytes import bytes_per_step, quantized, setups  # noqa: E402
from fixture_a import FIXTURE_A, fixture_config, reference, teacher_forced  # noqa: E402
from machine import describe_machine  # noqa: E402

RUNS = ("with_image", "no_image")


def logits(policy, kv_bits, image_kv_bits, dtype: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    model = mv.load(FIXTURE_A, dtype=dtype, config=fixture_config(), policy=policy)
    model.quantize_caches(kv_bits, image_kv_bits)
    return {run: teacher_forced(model, run) for run in RUNS}


def compare(ours: dict, unquantized: dict) -> dict[str, float]:
    ref = reference()
    out: dict[str, float] = {}
    text_err_ref, audio_err_ref, text_err_fp, audio_err_fp = [], [], [], []
    agree_fp, agree_ref = [], []
    for run in RUNS:
        text, audio = ours[run]
        text_fp, audio_fp = unquantized[run]
        text_err_ref.append(np.abs(text - ref[f"{run}.text_logits"]).max())
        audio_err_ref.append(np.abs(audio - ref[f"{run}.audio_logits"]).max())
        text_err_fp.append(np.abs(text - text_fp).max())
        audio_err_fp.append(np.abs(audio - audio_fp).max())
        argmax = np.concatenate([text.argmax(-1)[:, None], audio.argmax(-1)], axis=1)
        argmax_fp = np.concatenate([text_fp.argmax(-1)[:, None], audio_fp.argmax(-1)], axis=1)
        official = np.concatenate([ref[f"{run}.text_tokens"][:, None], ref[f"{run}.audio_tokens"]], axis=1)
        agree_fp.append(argmax == argmax_fp)
        agree_ref.append(argmax == official)
    out["text_error_vs_official"] = float(max(text_err_ref))
    out["audio_error_vs_official"] = float(max(audio_err_ref))
    out["text_error_vs_unquantized"] = float(max(text_err_fp))
    out["audio_error_vs_unquantized"] = float(max(audio_err_fp))
    out["greedy_agreement_vs_unquantized"] = float(np.mean(agree_fp))
    out["greedy_agreement_vs_official"] = float(np.mean(agree_ref))
    return {k: round(v, 4) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype on fixture A")
    ap.add_argument("--json", action="store_true", help="one JSON line per setup")
    args = ap.parse_args()
    cfg = mv.moshika_vis()
    unquantized = logits(None, None, None, args.dtype)
    if not args.json:
        print(f"# {describe_machine()}; fixture A, compute {args.dtype}")
        print(f"{'setup':45s} {'GB/step':>7s} {'text err':>8s} {'audio err':>9s} {'vs fp text':>10s} "
              f"{'vs fp audio':>11s} {'agree fp':>8s} {'agree off':>9s}")
    for name, (policy, kv_bits, image_kv_bits) in setups().items():
        size = bytes_per_step(quantized(cfg, policy), True, cfg.context, kv_bits, image_kv_bits)["total"]
        errors = compare(logits(policy, kv_bits, image_kv_bits, args.dtype), unquantized)
        if args.json:
            print(json.dumps({"setup": name, "dtype": args.dtype, "with_image_full_window_gb": size, **errors}))
        else:
            e = errors
            print(f"{name:45s} {size:7.3f} {e['text_error_vs_official']:8.3f} {e['audio_error_vs_official']:9.3f} "
                  f"{e['text_error_vs_unquantized']:10.3f} {e['audio_error_vs_unquantized']:11.3f} "
                  f"{e['greedy_agreement_vs_unquantized']:8.3f} {e['greedy_agreement_vs_official']:9.3f}")


if __name__ == "__main__":
    main()
