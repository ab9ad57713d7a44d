"""`python -m moshivis_mlx`: talk with MoshiVis about a picture, live or from files."""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from ..audio.mimi import MIMI_FRAME_SIZE, MIMI_SAMPLE_RATE, MimiError, load_mimi
from ..audio.wav import AudioFileError, TruncatedAudioWarning, WavWriter, read_wav_mono, write_text
from ..model.sampling import SamplerConfig, TokenSampler
from ..model.text import TokenizerError, load_tokenizer
from ..session.conversation import Conversation, IncompatibleModelError
from ..session.offline import DEFAULT_TAIL_SECONDS, ImageSwitch, converse_offline
from ..weights.checkpoint import CheckpointError
from ..weights.hub import BF16, DEFAULT_REPO, MissingFilesError, load_model, resolve_files
from ..weights.loading import parse_cache_bits
from ..weights.quantize import describe_caches

DESCRIPTION = """\
Talk with MoshiVis about a picture, in real time: it listens to your microphone
and answers through your speaker, with a live transcript.

  python -m moshivis_mlx --image photo.jpg
  python -m moshivis_mlx --image photo.jpg --input question.wav --output answer.wav
  python -m moshivis_mlx web     (in the browser: see python -m moshivis_mlx web --help)
  python -m moshivis_mlx doctor  (what this machine will do, and what to fix)

Loudspeakers work: echo cancellation keeps the model from hearing itself
(with headphones, --no-echo-cancel saves its CPU). While talking, type or drag
an image path into the terminal and press Enter to switch pictures ("none" for
no picture); Ctrl-C ends.
"""
FEATURES_SUFFIX = ".npy"  # precomputed SigLIP features (num_tokens, width) instead of a picture
_STATUS_SECONDS = 0.2  # status line refresh period
_SAMPLER = SamplerConfig()
_INTERRUPTED_EXIT = 130  # the shell's code for a program ended by Ctrl-C


class UsageError(ValueError):
    """Arguments that cannot work together, found before anything is loaded."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m moshivis_mlx", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--image", action="append", default=[], metavar="PATH[@SECONDS]",
                   help="the picture to talk about; in file mode repeat it with @SECONDS to switch pictures at "
                        "those times (a .npy file holds precomputed SigLIP features)")
    files = p.add_argument_group("file mode (instead of microphone and speaker)")
    files.add_argument("--input", metavar="WAV", help="the question: a WAV file of any rate, channels and format")
    files.add_argument("--output", metavar="WAV", help="where to write the spoken answer (24 kHz mono)")
    files.add_argument("--tail", type=float, default=DEFAULT_TAIL_SECONDS, metavar="SECONDS",
                       help=f"silence after the question, for the answer (default {DEFAULT_TAIL_SECONDS:g})")
    live = p.add_argument_group("live mode")
    live.add_argument("--list-devices", action="store_true", help="list audio devices and exit")
    live.add_argument("--input-device", metavar="ID", help="microphone: number or part of the name")
    live.add_argument("--output-device", metavar="ID", help="speaker: number or part of the name")
    live.add_argument("--record", metavar="WAV", help="save the conversation (you left, the model right)")
    live.add_argument("--max-lag", type=float, default=0.5, metavar="SECONDS",
                      help="drop input beyond this delay when the machine is slower than real time (default 0.5)")
    live.add_argument("--duration", type=float, metavar="SECONDS", help="end after this long")
    live.add_argument("--no-echo-cancel", dest="echo_cancel", action="store_false",
                      help="do not remove the model's voice from the microphone (fine with headphones)")
    p.add_argument("--transcript", metavar="TXT", help="write what the model said to this file")
    add_model_arguments(p)
    # Debugging aids for tests: a slower machine, and the live statistics as JSON.
    p.add_argument("--debug-step-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--debug-image-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--debug-mimi-max-seq-len", type=int, default=None, help=argparse.SUPPRESS)  # renew Mimi often
    p.add_argument("--debug-stats-json", help=argparse.SUPPRESS)
    return p


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The weights and sampling flags, shared with `python -m moshivis_mlx web`."""
    weights = p.add_argument_group("weights")
    which = weights.add_mutually_exclusive_group()
    which.add_argument("--model", metavar="PATH", help="a local checkpoint (file or directory) instead of the Hub's")
    which.add_argument("-q", "--quantize", type=int, choices=(4, 8),
                       help="Hub weights with 4- or 8-bit quantization (default: 8 with 24 GB of memory or more on a Pro, Max or Ultra chip, else 4)")
    which.add_argument("--bf16", action="store_true", help="the Hub's unquantized bf16 weights (16 GB)")
    weights.add_argument("--hf-repo", default=DEFAULT_REPO, metavar="REPO", help=f"default {DEFAULT_REPO}")
    weights.add_argument("--mimi", metavar="PATH", help="a local Mimi checkpoint (.safetensors)")
    weights.add_argument("--tokenizer", metavar="PATH", help="a local text tokenizer (sentencepiece .model)")
    weights.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                         help="compute dtype (default auto: bfloat16, or float32 for quantized weights on a CPU, "
                              "where it is ~9x faster)")
    weights.add_argument("--kv-bits", type=parse_cache_bits, default="auto", metavar="N|none",
                         help="store the conversation's keys and values at 4, 5, 6 or 8 bits, or 'none' (default: "
                              "4 for a 4-bit model, 8 for an 8-bit one, none for bf16): fewer bytes read per step")
    weights.add_argument("--image-kv-bits", type=parse_cache_bits, default="auto", metavar="N|none",
                         help="the same for the picture's keys and values (default: 8 for quantized models)")
    sampling = p.add_argument_group("sampling")
    sampling.add_argument("--seed", type=int, help="make the answer reproducible")
    sampling.add_argument("--greedy", action="store_true", help="always the most likely token (no sampling)")
    for stream, sampler in (("text", _SAMPLER.text), ("audio", _SAMPLER.audio)):
        sampling.add_argument(f"--{stream}-temperature", type=float, default=sampler.temperature, metavar="T",
                              help=f"(default {sampler.temperature:g})")
        sampling.add_argument(f"--{stream}-top-k", type=int, default=sampler.top_k, metavar="K",
                              help=f"(default {sampler.top_k})")


# -- arguments ---------------------------------------------------------------------


def parse_image_switches(values: list[str], file_mode: bool) -> list[tuple[float, str]]:
    """`PATH` or `PATH@SECONDS` -> sorted (seconds, path); every path must exist."""
    switches = []
    for value in values:
        path, seconds = split_image_switch(value)
        if Path(path).expanduser().is_dir():
            raise UsageError(f"--image {value}: {path} is a directory; give a picture file (or a .npy of features)")
        if not Path(path).expanduser().is_file():
            raise UsageError(f"--image {value}: no such file")
        if seconds < 0:
            raise UsageError(f"--image {value}: the time must be >= 0 seconds")
        switches.append((seconds, path))
    switches.sort(key=lambda s: s[0])
    if not file_mode and (len(switches) > 1 or (switches and switches[0][0] > 0)):
        raise UsageError("several --image or @SECONDS work in file mode; live, type a path to switch pictures")
    if len({s for s, _ in switches}) != len(switches):
        raise UsageError("two --image switches at the same time")
    return switches


def split_image_switch(value: str) -> tuple[str, float]:
    """`PATH@SECONDS` -> (PATH, SECONDS); `PATH` (even one holding an @) -> (PATH, 0).

    An existing PATH whose @ is followed by something other than a number of
    seconds is a mistyped time, not a missing file, and is reported as such.
    """
    head, sep, tail = value.rpartition("@")
    if not sep or Path(value).expanduser().exists():
        return value, 0.0
    try:
        seconds = float(tail)
    except ValueError:
        seconds = math.nan
    if math.isfinite(seconds):
        return head, seconds
    if Path(head).expanduser().exists():
        raise UsageError(f"--image {value}: {tail!r} after @ is not a number of seconds (e.g. {head}@2.5)")
    return value, 0.0


def image_argument(path: str):
    """What `Conversation` gets for an image path: features for .npy, else the path itself."""
    path = str(Path(path).expanduser())
    if path.lower().endswith(FEATURES_SUFFIX):
        try:
            return np.load(path)
        except (OSError, ValueError) as e:
            raise UsageError(f"{path}: not a .npy array of SigLIP features ({e})") from None
    return path


def check_arguments(args) -> None:
    """Everything that can be checked before minutes of loading."""
    if args.output and not args.input:
        raise UsageError("--output needs --input (the question as a WAV file)")
    if args.input and not args.output:
        raise UsageError("--input needs --output (where to write the answer)")
    if args.input and args.record:
        raise UsageError("--record is for live mode; in file mode --output is the answer")
    if args.input and not Path(args.input).expanduser().is_file():
        raise AudioFileError(args.input, "no such file")
    for flag, value in (("--model", args.model), ("--mimi", args.mimi), ("--tokenizer", args.tokenizer)):
        if value is not None and not Path(value).expanduser().exists():
            raise UsageError(f"{flag} {value}: no such file or directory")
    for flag, value in (("--output", args.output), ("--record", args.record), ("--transcript", args.transcript)):
        if value is not None and not Path(value).expanduser().resolve().parent.is_dir():
            raise UsageError(f"{flag} {value}: the directory does not exist")
    frame_seconds = MIMI_FRAME_SIZE / MIMI_SAMPLE_RATE
    if args.max_lag < frame_seconds:
        raise UsageError(f"--max-lag must be at least one frame ({frame_seconds:g} s)")
    if (args.duration is not None and args.duration <= 0) or args.tail < 0:
        raise UsageError("--duration must be > 0 and --tail >= 0")


def make_sampler(args) -> SamplerConfig:
    if args.greedy:
        return SamplerConfig(text=TokenSampler(), audio=TokenSampler(), seed=args.seed)
    return SamplerConfig(
        text=TokenSampler(temperature=args.text_temperature, top_k=args.text_top_k),
        audio=TokenSampler(temperature=args.audio_temperature, top_k=args.audio_top_k),
        seed=args.seed,
    )


def load_conversation(args, images: list[tuple[str, object]]) -> Conversation:
    """The conversation, looking at the first of `images` ((label, image) pairs);
    every one is tried first, so a bad picture fails now, not minutes in."""
    bits = BF16 if args.bf16 else args.quantize
    files = resolve_files(model=args.model, mimi=args.mimi, tokenizer=args.tokenizer, bits=bits, repo=args.hf_repo)
    which = f"{files.bits}-bit" if files.bits not in (None, BF16) else "bf16" if files.bits == BF16 else "local"
    print(f"loading the {which} model from {files.model}", file=sys.stderr)
    mimi_limits = {"max_seq_len": args.debug_mimi_max_seq_len} if getattr(args, "debug_mimi_max_seq_len", None) else {}
    tokenizer, mimi = load_tokenizer(files.tokenizer), load_mimi(files.mimi, **mimi_limits)  # the quick ones first
    model = load_model(files.model, dtype=args.dtype, kv_bits=args.kv_bits, image_kv_bits=args.image_kv_bits)
    print(f"caches: {describe_caches(model.cache_quantization)}", file=sys.stderr)
    if args.debug_image_delay:
        model.embed_image = _slowed(model.embed_image, args.debug_image_delay)
    conversation = Conversation(model, mimi, tokenizer, sampler=make_sampler(args))
    for label, image in reversed(images):
        try:
            conversation.set_image(image)
        except (ValueError, TypeError, OSError) as e:
            conversation.close()
            raise UsageError(f"--image {label}: cannot use it ({e})") from None
    return conversation


def _slowed(embed_image, seconds: float):
    """Debugging aid: pretend pictures take `seconds` to embed (as SigLIP does on a CPU)."""

    def slow_embed_image(image, **kwargs):
        from ..model.temporal import ImageKV

        if not isinstance(image, ImageKV):  # already embedded: returned as is
            time.sleep(seconds)
        return embed_image(image, **kwargs)

    return slow_embed_image


# -- modes -------------------------------------------------------------------------


def read_question(path: str) -> np.ndarray:
    """The question at Mimi's rate; a truncated file is used, and a one-line warning says so."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TruncatedAudioWarning)
        pcm = read_wav_mono(path, MIMI_SAMPLE_RATE)
    for warning in caught:
        if issubclass(warning.category, TruncatedAudioWarning):
            print(f"warning: {warning.message}", file=sys.stderr)
        else:  # not ours to reformat: shown as Python would have
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    return pcm


def run_file_mode(args, switches: list[tuple[float, str]]) -> int:
    pcm = read_question(args.input)  # before loading: a bad file fails fast
    images = [(path, image_argument(path)) for _, path in switches]
    later = [ImageSwitch(t, image) for (t, _), (_, image) in zip(switches, images) if t > 0]
    if not switches or switches[0][0] > 0:
        images.insert(0, ("none", None))  # no picture until the first switch
    conversation = load_conversation(args, images)
    try:
        with WavWriter(args.output, conversation.sample_rate) as writer:
            result = converse_offline(conversation, pcm, tail_seconds=args.tail, image_switches=later,
                                      on_frame=writer.write, progress=True)
    finally:
        conversation.close()
    if args.transcript:
        write_text(args.transcript, result.transcript + "\n")
    print(result.transcript)
    speed = result.seconds / result.elapsed if result.elapsed else float("inf")
    print(f"wrote {args.output}: {result.seconds:.1f} s of audio in {result.elapsed:.1f} s "
          f"({speed:.2f}x real time, {1000 * result.mean_step_seconds:.0f} ms per step)", file=sys.stderr)
    return 0


def format_status(stats, frame_seconds: float) -> str:
    return (f"rtf {stats.real_time_factor(frame_seconds):.2f} | lag {stats.lag_seconds:.2f}s | "
            f"dropped {stats.dropped_frames} | underruns {stats.underruns} | {format_echo(stats)}")


def format_echo(stats) -> str:
    """`echo cancel on|off`, and why it may not work: separate clocks, a late speaker signal."""
    if not stats.echo_cancel:
        return "echo cancel off"
    if stats.reference_late:
        return "echo cancel on, but the speaker signal comes late: echo stays"
    return "echo cancel on" if stats.duplex else "echo cancel on (separate clocks)"


def format_start(stats) -> str:
    """The line that says the conversation started, with the sound setup."""
    if stats.duplex:
        rates = f"{stats.input_rate} Hz, one stream both ways"
    else:
        rates = f"{stats.input_rate} Hz in, {stats.output_rate} Hz out"
    if not stats.echo_cancel:
        echo = "echo cancellation off: use headphones"
    elif stats.duplex:
        echo = "echo cancellation on"
    else:
        echo = ("echo cancellation on, but the microphone and speaker run on separate clocks, "
                "so some echo may get through (headphones with --no-echo-cancel are safest)")
    return (f"listening ({rates}; {echo}). Talk about the picture. Type or drag an image path and press Enter "
            "to switch; Ctrl-C to end.")


def format_summary(stats) -> str:
    stage, stage_seconds = stats.slowest_stage()
    return (
        f"conversation ended after {stats.seconds:.1f} s: {stats.steps} steps, latency mean "
        f"{1000 * stats.mean_latency_seconds:.1f} ms (max {1000 * stats.latency_seconds_max:.1f} ms), "
        f"slowest stage {stage or '-'} {1000 * stage_seconds:.1f} ms per frame; "
        f"dropped {stats.dropped_frames} input frames to bound the lag (max lag {stats.max_lag_seconds:.2f} s); "
        f"{stats.underruns} speaker underruns ({stats.underrun_seconds:.1f} s of silence); "
        + (f"echo cancellation {1000 * stats.echo_cancel_seconds_per_frame:.2f} ms per frame"
           if stats.echo_cancel else "echo cancellation off")
    )


def run_live_mode(args, sd, switches: list[tuple[float, str]]) -> int:
    conversation = load_conversation(args, [(path, image_argument(path)) for _, path in switches])
    try:
        return _talk_live(args, sd, conversation)
    finally:
        if conversation.preparing_image:
            print("finishing the picture being prepared before exiting...", file=sys.stderr)
        conversation.close()


def _talk_live(args, sd, conversation) -> int:
    from .console import LiveDisplay, TypedImageReader
    from .live import LiveSession

    session = LiveSession(conversation, sd, input_device=args.input_device, output_device=args.output_device,
                          max_lag_seconds=args.max_lag, record=args.record, step_delay=args.debug_step_delay,
                          echo_cancel=args.echo_cancel)
    # The status line says when the speaker signal comes late; the canceller's warning would break it.
    warnings.filterwarnings("ignore", message="the speaker signal reaches the echo canceller", category=RuntimeWarning)
    display = LiveDisplay()

    def on_path(path: str | None, label: str) -> None:
        if path is not None and not Path(path).is_file():
            display.message(f"{label} is a directory: give an image file" if Path(path).is_dir()
                            else f"no such file: {label}")
            return
        try:
            session.request_image(None if path is None else image_argument(path), label)
        except UsageError as e:
            display.message(str(e))

    stats = session.stats
    try:
        session.start()
    except KeyboardInterrupt:  # during the warm-up
        session.stop()
        raise
    print(format_start(stats), file=sys.stderr)
    TypedImageReader(on_path).start()
    try:
        while session.running:
            _show_events(session, display)
            display.status(format_status(stats, session.frame_seconds))
            if args.duration is not None and session.elapsed() >= args.duration:
                break
            time.sleep(_STATUS_SECONDS)
    except KeyboardInterrupt:
        pass
    finally:
        previous = _ignore_interrupts()  # a second Ctrl-C must not leave half-written files
        try:
            session.stop()
            _show_events(session, display)
            display.finish()
        finally:
            _restore_interrupts(previous)
    if args.transcript:
        write_text(args.transcript, conversation.transcript + "\n")
    if args.debug_stats_json:
        write_text(args.debug_stats_json, json.dumps({
            **stats.to_dict(), "mimi": _mimi_renewals(conversation.mimi),
            "error": repr(session.error) if session.error else None,
        }))
    print(format_summary(stats), file=sys.stderr)
    if session.error is not None:
        raise session.error
    return 0


def _mimi_renewals(codec) -> dict:
    """Each direction's take-overs (first frame fed, first frame answered) and stalls, for benchmarks."""
    return {
        name: {"takeovers": coder.takeovers, "stalls": coder.stalls}
        for name in ("encoder", "decoder")
        if hasattr(coder := getattr(codec, name, None), "takeovers")
    }


def _show_events(session, display) -> None:
    import queue

    while True:
        try:
            kind, value = session.events.get_nowait()
        except queue.Empty:
            return
        (display.text if kind == "text" else display.message)(value)


def _ignore_interrupts():
    try:
        return signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread (called from a test or an app)
        return None


def _restore_interrupts(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGINT, previous)


# -- entry point -------------------------------------------------------------------

_KNOWN_ERRORS = (UsageError, AudioFileError, CheckpointError, MissingFilesError, MimiError, TokenizerError,
                 IncompatibleModelError)


WEB_COMMAND = "web"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [WEB_COMMAND]:  # the web page has its own options (moshivis_mlx/web)
        from .web.command import main as web_main

        return web_main(argv[1:])
    args = build_parser().parse_args(argv)
    from ..audio.devices import AudioDeviceError

    try:
        return _run(args)
    except (*_KNOWN_ERRORS, AudioDeviceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the conversation started (loading, warm-up)
        print("interrupted", file=sys.stderr)
        return _INTERRUPTED_EXIT
    finally:
        _release_mlx()


def _release_mlx() -> None:
    """MLX asks every thread that used it to clear its streams before exiting."""
    if "mlx.core" in sys.modules:
        sys.modules["mlx.core"].clear_streams()


def _run(args) -> int:
    from .live import describe_devices, find_device, import_sounddevice, make_canceller

    if args.list_devices:
        print(describe_devices(import_sounddevice()))
        return 0
    check_arguments(args)
    switches = parse_image_switches(args.image, file_mode=bool(args.input))
    if args.input:
        return run_file_mode(args, switches)
    sd = import_sounddevice()  # before loading anything: fail fast without PortAudio, devices or livekit
    find_device(sd, args.input_device, "input")
    find_device(sd, args.output_device, "output")
    if args.echo_cancel:
        make_canceller(MIMI_SAMPLE_RATE)
    return run_live_mode(args, sd, switches)
