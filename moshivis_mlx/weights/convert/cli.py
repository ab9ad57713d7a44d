"""The command line of `python -m moshivis_mlx convert`, `moshivis-mlx-convert` and `python -m convert`."""

from __future__ import annotations

import argparse
import errno
import signal
import sys
import threading
from pathlib import Path

from ...model.config import ModelConfig
from ..checkpoint import CheckpointError
from ..loading import DTYPES as LOAD_DTYPES
from ..loading import AUTO_CACHE, parse_cache_bits, read_config
from ..quantize import (
    BITS_CHOICES,
    CACHE_BITS,
    DEFAULT_GROUP_SIZE,
    GROUP_SIZES,
    SENSITIVE_BITS,
    QuantizationPolicy,
    describe_caches,
)
from .converter import ConvertError, ConvertResult, convert_checkpoint
from .progress import ProgressLine

DTYPES = tuple(LOAD_DTYPES)
_POLICY_DEFAULT = -1  # --sensitive-bits not given (not a string: argparse would parse it)
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130

_DESCRIPTION = """\
Convert a MoshiVis checkpoint (official PyTorch file, upstream MLX bf16/q4/q8
file, or one of ours) into a directory with config.json and model.safetensors
that moshivis_mlx.load opens directly, optionally quantized.

Default mixed policy: the temporal transformer layers get --bits; embeddings,
text head and depformer get --sensitive-bits (8); the shared cross-attention's
per-layer projections get --cross-attention-bits (4 at --bits 4 or fewer, else
8); norms and the image projection stay in --dtype; the vision tower too
unless --vision-bits is given. config.json also records how `load` stores the
KV window and the image K/V (--kv-bits: 4 at --bits 4 or fewer, else 8;
--image-kv-bits: 8; float for an unquantized model)."""


def _bits_or_none(value: str) -> int | None:
    if value.lower() in ("none", "float", "bf16"):
        return None
    bits = int(value)
    if bits not in BITS_CHOICES:
        raise argparse.ArgumentTypeError(f"must be one of {BITS_CHOICES} or 'none'")
    return bits


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m moshivis_mlx convert",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", type=Path, help="checkpoint file, or a directory holding model.safetensors")
    p.add_argument("output", type=Path, help="directory to create (config.json + model.safetensors)")
    p.add_argument("--bits", type=int, choices=BITS_CHOICES, help="quantize to this many bits (default: keep float)")
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES, help=f"quantization group size (default {DEFAULT_GROUP_SIZE})")
    p.add_argument("--policy", choices=("mixed", "uniform"), default="mixed",
                   help="mixed (default): sensitive modules keep more bits; uniform: every language-model layer at --bits")
    p.add_argument("--sensitive-bits", type=_bits_or_none, default=_POLICY_DEFAULT, metavar="N|none",
                   help=f"bits of embeddings, text head, shared cross-attention and depformer in the mixed policy (default {SENSITIVE_BITS}; 'none' keeps them in --dtype)")
    p.add_argument("--cross-attention-bits", type=_bits_or_none, default=_POLICY_DEFAULT, metavar="N|none",
                   help="bits of the shared cross-attention's q and out projections, read by every layer "
                   "(default 4 at --bits 4 or fewer, else 8)")
    p.add_argument("--depformer-bits", type=_bits_or_none, default=_POLICY_DEFAULT, metavar="N|none",
                   help=f"bits of the depformer's linear layers (default {SENSITIVE_BITS})")
    p.add_argument("--kv-bits", type=parse_cache_bits, default=AUTO_CACHE, metavar="N|none",
                   help=f"store the KV window at {'/'.join(map(str, CACHE_BITS))} bits, or 'none' (default: "
                   "4 at --bits 4 or fewer, 8 for other quantized models, none for float ones)")
    p.add_argument("--image-kv-bits", type=parse_cache_bits, default=AUTO_CACHE, metavar="N|none",
                   help="store the image K/V at this many bits, or 'none' (default: 8 for quantized models)")
    p.add_argument("--vision-bits", type=_bits_or_none, default=None, metavar="N|none",
                   help="also quantize the SigLIP vision tower's linear layers (default: none)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                   help="dtype of everything not quantized, and of the quantization scales (default bfloat16)")
    p.add_argument("--config", type=Path, help="config.json describing the model (default: next to INPUT, else the released moshika-vis sizes)")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--report", action="store_true",
                   help="after writing, print bits per weight, size and the teacher-forced error against the unquantized model")
    p.add_argument("--report-dtype", choices=DTYPES, default="float32",
                   help="compute dtype of both models in --report (default float32: quantization error only; "
                   "bfloat16 halves the memory the unquantized model needs)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def policy_from_args(args: argparse.Namespace) -> QuantizationPolicy | None:
    tiers = {
        "sensitive_bits": args.sensitive_bits,
        "cross_attention_bits": args.cross_attention_bits,
        "depformer_bits": args.depformer_bits,
    }
    tiers = {name: bits for name, bits in tiers.items() if bits != _POLICY_DEFAULT}
    if args.bits is None:
        given = args.group_size, args.vision_bits, args.policy != "mixed", bool(tiers)
        if any(x not in (None, False) for x in given):
            raise ConvertError(
                "--group-size, --policy, --sensitive-bits, --cross-attention-bits, --depformer-bits and "
                "--vision-bits need --bits"
            )
        return None
    group = args.group_size or DEFAULT_GROUP_SIZE
    if args.policy == "uniform":
        if tiers:
            raise ConvertError("--sensitive-bits, --cross-attention-bits and --depformer-bits only apply to the mixed policy")
        return QuantizationPolicy.uniform(args.bits, group, vision_bits=args.vision_bits)
    return QuantizationPolicy.mixed(args.bits, group, vision_bits=args.vision_bits, **tiers)


def _summary(result: ConvertResult) -> list[str]:
    return [
        f"wrote {result.output_dir} ({result.num_tensors} tensors, {result.file_bytes / 1e9:.3f} GB, "
        f"{result.bits_per_weight:.2f} bits per weight, from the {result.source_layout} layout, "
        f"{result.seconds:.1f} s)",
        f"quantization: {result.quantization_summary}",
        f"caches: {describe_caches(result.caches)}",
    ]


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    err = sys.stderr
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:  # clean up on `kill` as on Ctrl-C (signals only reach the main thread)
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        policy = policy_from_args(args)
        config: ModelConfig | None = read_config(args.config) if args.config else None
        progress: list[ProgressLine] = []

        def on_start(total: int) -> None:
            if not args.quiet:
                progress.append(ProgressLine(total, "converting"))

        def on_tensor(name: str, nbytes: int) -> None:
            if progress:
                progress[0].update(nbytes)

        result = convert_checkpoint(
            args.input, args.output, policy=policy, dtype=args.dtype, config=config, force=args.force,
            kv_bits=args.kv_bits, image_kv_bits=args.image_kv_bits, on_start=on_start, on_tensor=on_tensor,
        )
        if progress:
            progress[0].close()
        for line in _summary(result):
            print(line)
        if args.report:
            _print_report(args, result, config)
        return 0
    except KeyboardInterrupt:
        print(f"\ninterrupted: nothing was written to {args.output}", file=err)
        return EXIT_INTERRUPTED
    except (CheckpointError, ConvertError, ValueError) as e:
        print(f"error: {e}", file=err)
        return EXIT_ERROR
    except OSError as e:
        hint = " (disk full: free some space)" if e.errno == errno.ENOSPC else ""
        print(f"error: {e.strerror or e}{hint} while converting to {args.output}; nothing was written", file=err)
        return EXIT_ERROR
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _print_report(args: argparse.Namespace, result: ConvertResult, config: ModelConfig | None) -> None:
    from .report import quality_report

    print(f"bits per weight: {result.bits_per_weight:.3f} (file {result.file_bytes / 1e9:.3f} GB, {result.num_params / 1e9:.3f} B weights)")
    if result.quantization is None:
        print("not quantized: no quantization error to report")
        return
    from ..loading import open_checkpoint

    if open_checkpoint(args.input, config).quantization is not None:
        print("the input was already quantized: there is no unquantized model to compare against")
        return
    report = quality_report(result.output_dir, args.input, config, dtype=args.report_dtype)
    for line in report.lines():
        print(line)
