"""Mimi, Kyutai's streaming audio codec, through `rustymimi`.

24 kHz mono; every 80 ms frame (1920 samples) becomes 8 codes of 2048 values
and back. `rustymimi` precomputes its rotary embeddings for a fixed number of
positions (its transformers run at 25 Hz, so an instance fails after
`max_seq_len / 2` frames), and its `reset()` clears the streaming state but
not the position: a reset instance fails as early as one never reset.

`load_mimi` removes both limits:
  * each instance runs in a process of its own (`codec_worker`): building one
    holds the GIL for up to 1.5 s, which in-process would freeze every
    thread of the conversation, audio callbacks included;
  * the encoder and the decoder are separate instances (one instance cannot
    encode and decode at the same time), so the two directions run in
    parallel with each other and with the model;
  * before an instance runs out, a successor, built ahead of time, is fed
    the same frames alongside it for `RENEWAL_OVERLAP_FRAMES` and then takes
    over. The codec's attention layers see the last 250 steps (10 s) and its
    convolutions a few frames, so after 30 s of overlap the successor's
    output differs from the old instance's by 0.5% of the signal (random
    weights, benchmarks/bench_mimi.py) and its codes are identical. The
    successor is fed `FEED_CHUNK_FRAMES` frames per call, for half the CPU
    of frame-by-frame feeding, and takes over once it has caught up, so no
    frame waits for it (`RenewingCoder`);
  * `reset()` switches to a fresh instance built ahead of time (the spare),
    so it is exact and immediate.
"""

from __future__ import annotations

import os
import queue
import select
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from .codec_worker import HEADER, read_exactly

MIMI_SAMPLE_RATE = 24_000
MIMI_FRAME_SIZE = 1920  # samples per 80 ms frame (12.5 Hz)
MIMI_CODEBOOK_SIZE = 2048  # codes per codebook: values 0..2047
MIMI_NUM_CODEBOOKS = 8  # codebooks MoshiVis uses, of the 32 Mimi has
MIMI_STEPS_PER_FRAME = 2  # Mimi's transformers run at 25 Hz
RENEWAL_OVERLAP_FRAMES = 375  # 30 s: a decoder fed 12 s differs by 20% of the signal, 24 s: 1.5%
MAX_SEQ_LEN = 32_768  # positions precomputed per instance (~22 min; ~8 MB of tables)
FEED_CHUNK_FRAMES = 5  # frames per call when feeding a successor: ~20/23 ms a frame to encode/decode instead of ~42/47

ENCODE, DECODE = "encode", "decode"


class StreamingCodec(Protocol):
    """What a conversation needs from a codec (Mimi, or a stand-in in tests).

    `encode` and `decode` may be called from two different threads at once;
    `reset` only while neither runs."""

    sample_rate: int
    frame_size: int
    codebook_size: int
    num_codebooks: int

    def encode(self, frame: np.ndarray) -> np.ndarray: ...  # (frame_size,) float32 -> (num_codebooks,) int
    def decode(self, codes: np.ndarray) -> np.ndarray: ...  # (num_codebooks,) int -> (frame_size,) float32
    def reset(self) -> None: ...


class MimiError(RuntimeError):
    """Mimi could not be loaded or run."""


class RustyMimi:
    """One `rustymimi.Tokenizer` in this process, frame by frame. It fails
    after `max_seq_len // 2` frames, and holds the GIL while it loads: use
    `load_mimi`, which renews instances in processes of their own."""

    sample_rate = MIMI_SAMPLE_RATE
    frame_size = MIMI_FRAME_SIZE
    codebook_size = MIMI_CODEBOOK_SIZE

    def __init__(self, path: str | Path, num_codebooks: int = MIMI_NUM_CODEBOOKS, max_seq_len: int = MAX_SEQ_LEN):
        try:
            import rustymimi
        except ImportError as e:
            raise MimiError(f"the Mimi codec needs `rustymimi` (pip install rustymimi): {e}") from None
        path = _checked_path(path)
        self.num_codebooks = num_codebooks
        self.max_frames = max_seq_len // MIMI_STEPS_PER_FRAME
        try:
            self._tokenizer = rustymimi.Tokenizer(str(path), num_codebooks=num_codebooks, max_seq_len=max_seq_len)
        except Exception as e:  # rustymimi raises ValueError with a Rust backtrace
            raise MimiError(f"{path}: not a usable Mimi checkpoint ({_first_line(e)})") from None

    def encode(self, frame: np.ndarray) -> np.ndarray:
        pcm = np.ascontiguousarray(frame, np.float32).reshape(1, 1, -1)
        codes = self._tokenizer.encode_step(pcm)  # (1, num_codebooks, 1) uint32
        return codes[0, :, 0].astype(np.int64)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        codes = np.ascontiguousarray(codes, np.uint32).reshape(1, -1, 1)
        pcm = self._tokenizer.decode_step(codes)  # (1, 1, frame_size) float32
        return pcm[0, 0]

    def reset(self) -> None:
        self._tokenizer.reset()


# -- instances: what a renewing coder drives -----------------------------------------------


class CodecInstance(Protocol):
    """One limited-life codec instance, driven in one direction."""

    max_frames: int

    def ready(self) -> bool: ...  # built (never blocks)
    def wait_ready(self) -> None: ...  # until built; a bad checkpoint raises here
    def run(self, direction: str, data: np.ndarray) -> np.ndarray: ...  # one frame, answered
    def feed(self, direction: str, frames: np.ndarray) -> None: ...  # (k, frame) in one call; no answer, never blocks
    def caught_up(self) -> bool: ...  # everything fed is done (never blocks)
    def sync(self) -> None: ...  # wait until everything fed is done; raises its error
    def close(self) -> None: ...


class MimiProcess:
    """A `rustymimi.Tokenizer` in a child process (see `codec_worker`).
    Starting returns at once; the instance builds in the background."""

    def __init__(self, path: str | Path, num_codebooks: int = MIMI_NUM_CODEBOOKS, max_seq_len: int = MAX_SEQ_LEN):
        self.path = _checked_path(path)
        self.num_codebooks = num_codebooks
        self.max_frames = max_seq_len // MIMI_STEPS_PER_FRAME
        package_root = str(Path(__file__).resolve().parents[2])  # the directory holding moshivis_mlx/
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moshivis_mlx.audio.codec_worker", str(self.path), str(num_codebooks), str(max_seq_len)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, env=env,
        )
        self._ready = False
        self._feeds: queue.SimpleQueue | None = None  # requests for the writer thread while fed
        self._writer: threading.Thread | None = None
        self._marks = self._answered = 0  # 'S' sent after feeds and syncs; their answers read

    @property
    def pid(self) -> int:
        """The child's process id (benchmarks read its CPU time)."""
        return self._process.pid

    def ready(self) -> bool:
        if not self._ready and select.select([self._process.stdout], [], [], 0)[0]:
            self._expect(b"R")
        return self._ready

    def wait_ready(self) -> None:
        if not self._ready:
            self._expect(b"R")

    def run(self, direction: str, data: np.ndarray) -> np.ndarray:
        """One frame (never called while fed: a renewing coder syncs a successor before it answers)."""
        self.wait_ready()
        self._send(_request(direction, data, answer=True))
        payload = self._expect(b"O")
        return np.frombuffer(payload, np.int64 if direction == ENCODE else np.float32).copy()

    def feed(self, direction: str, frames: np.ndarray) -> None:
        """`frames` ((k, 1920) pcm or (k, codebooks) codes) in one request, followed by an 'S'
        whose answer `caught_up` reads when it comes."""
        if self._feeds is None:  # a thread writes, so a slow child never blocks the caller
            self._feeds = queue.SimpleQueue()
            self._writer = threading.Thread(target=self._write_feeds, name="moshivis-mimi-feed", daemon=True)
            self._writer.start()
        self._feeds.put(_request(direction, frames, answer=False) + _MARK)
        self._marks += 1

    def caught_up(self) -> bool:
        """Whether the child has done everything fed so far: reads the answers to the marks
        that have arrived, never waits for one."""
        if not self.ready():
            return False
        while self._answered < self._marks and select.select([self._process.stdout], [], [], 0)[0]:
            self._expect(b"O")
            self._answered += 1
        return self._answered == self._marks

    def sync(self) -> None:
        self.wait_ready()
        if self._feeds is not None:
            self._feeds.put(None)
            self._writer.join()
            self._feeds = self._writer = None
        self._send(_MARK)
        self._marks += 1
        while self._answered < self._marks:  # the feeds' marks first, in order
            self._expect(b"O")
            self._answered += 1

    def close(self) -> None:
        if self._feeds is not None:
            self._feeds.put(None)
        try:
            self._process.stdin.close()
        except OSError:
            pass
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process.stdout.close()

    def _write_feeds(self) -> None:
        while (request := self._feeds.get()) is not None:
            if not self._send(request, quiet=True):
                return

    def _send(self, request: bytes, quiet: bool = False) -> bool:
        try:
            self._process.stdin.write(request)
            return True
        except (BrokenPipeError, ValueError):  # the child died: its last message says why
            if quiet:
                return False
            self._expect(b"O")
            raise  # not reached: _expect raises

    def _expect(self, op: bytes) -> bytes:
        header = read_exactly(self._process.stdout, HEADER.size)
        if header is None:
            code = self._process.wait()
            raise MimiError(f"{self.path}: the Mimi process ended unexpectedly (exit status {code})")
        got, size = HEADER.unpack(header)
        payload = read_exactly(self._process.stdout, size) if size else b""
        if got == b"X":
            raise MimiError(f"{self.path}: {payload.decode(errors='replace')}")
        if got != op:
            raise MimiError(f"{self.path}: the Mimi process answered {got!r} instead of {op!r}")
        if op == b"R":
            self._ready = True
        return payload


_MARK = HEADER.pack(b"S", 0)


def _request(direction: str, data: np.ndarray, answer: bool) -> bytes:
    """One frame, or (k, ...) frames, as one message (frame after frame, as codec_worker reads them)."""
    if direction == ENCODE:
        op, payload = b"E", np.ascontiguousarray(data, np.float32).tobytes()
    else:
        op, payload = b"D", np.ascontiguousarray(data, np.uint32).tobytes()
    return HEADER.pack(op if answer else op.lower(), len(payload)) + payload


class InProcess:
    """Any codec with `encode`/`decode` (a stand-in, a `RustyMimi`) as a `CodecInstance`."""

    def __init__(self, codec):
        self.codec = codec
        self.max_frames = int(codec.max_frames)
        self._error: BaseException | None = None

    def ready(self) -> bool:
        return True

    def wait_ready(self) -> None:
        pass

    def run(self, direction: str, data: np.ndarray) -> np.ndarray:
        return getattr(self.codec, direction)(data)

    def feed(self, direction: str, frames: np.ndarray) -> None:
        code = getattr(self.codec, direction)
        for frame in frames:  # the codec's own step, one frame at a time
            if self._error is not None:
                return
            try:
                code(frame)
            except Exception as e:  # reported at sync, as a process would
                self._error = e

    def caught_up(self) -> bool:
        return True

    def sync(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        pass


# -- renewal -------------------------------------------------------------------------------


class RenewingCoder:
    """One direction (encode or decode) of a codec made of limited instances.

    Every `renewal_period` frames (`max_frames - overlap_frames -
    catch_up_frames`), counted from the first frame an instance saw, its
    successor (the spare, built ahead of time) starts being fed the frames
    the current instance answers; once fed `overlap_frames` and caught up it
    answers instead, and a new spare starts building. `reset()` switches to
    the spare at once. No frame waits for an instance to load unless the
    spare is not built yet (counted in `waits`).

    Chunks: the successor is fed `feed_chunk` frames per call, buffered
    here. rustymimi steps k frames at once for about half the CPU per frame:
    at k = 5, 20 ms instead of 42 to encode a frame and 23 instead of 47 to
    decode (2 cores, random full-size weights; codes identical to feeding
    frame by frame, pcm within 6e-7). Fed frame by frame, a successor added
    a full Mimi step per frame and live mode dropped frames on 2 cores
    during every renewal. The price: bursts of ~120-140 ms every 5 frames in
    the successor's process.

    Taking over: a successor answers only once it has caught up (done all
    it was sent), checked without blocking at the start of each frame after
    the overlap, so no frame waits for a chunk just sent. Each frame is
    given to the successor before the old instance runs it (the successor
    has the whole frame to work), and the overlap's last `single_frames`
    (2 * feed_chunk) one at a time: the last chunk is worked off before the
    overlap ends, and a single frame is done within its own frame, so the
    successor usually takes over right after the overlap (for ~0.2 s more
    CPU per renewal). Until it has caught up it is fed frame by frame; one
    still behind `catch_up_frames` (4 * feed_chunk) after the overlap, or
    when the old life ends, is waited for (counted in `stalls`): so are
    most when frames come faster than real time (a file, a benchmark), as
    every renewal was before chunks. The frame of the switch depends on
    timing, so two runs may differ just after a renewal by what separates
    the old instance from the new one (codes identical, pcm within ~7e-4
    after 375 frames of overlap: bench_mimi.py renewal). The old instance is
    closed on a thread of its own (a process takes 70-200 ms to end).
    `takeovers` lists, per renewal, the frame its successor was first fed
    and the frame it first answered (frames counted from this coder's start).
    """

    def __init__(
        self,
        start: Callable[[], CodecInstance],
        direction: str,
        overlap_frames: int = RENEWAL_OVERLAP_FRAMES,
        first_renewal: int | None = None,
        feed_chunk: int = FEED_CHUNK_FRAMES,
    ):
        if feed_chunk < 1:
            raise ValueError(f"feed_chunk must be at least 1 frame, not {feed_chunk}")
        self._start = start
        self.direction = direction
        self.overlap_frames = overlap_frames
        self.feed_chunk = feed_chunk
        self.catch_up_frames = 4 * feed_chunk
        self.single_frames = min(2 * feed_chunk, overlap_frames // 2)  # the overlap's last frames, one at a time
        self._current = start()
        self.max_frames = int(self._current.max_frames)
        window = overlap_frames + self.catch_up_frames  # the most frames a successor is fed
        if 2 * window > self.max_frames:  # else a successor would have to take over half warmed up
            self._current.close()
            raise ValueError(f"an instance's life ({self.max_frames} frames) must be at least twice the "
                             f"overlap ({overlap_frames} frames) and the catch-up ({self.catch_up_frames} frames)")
        self.renewal_period = self.max_frames - window
        self._first_renewal = self.renewal_period if first_renewal is None else first_renewal
        self._spare: CodecInstance | None = start()
        self._successor: CodecInstance | None = None
        self.frames = 0  # frames this coder answered
        self.takeovers: list[tuple[int, int]] = []
        self.waits = 0
        self.stalls = 0
        self._retiring: list[threading.Thread] = []
        self._begin(self._first_renewal)

    @property
    def renewals(self) -> int:
        return len(self.takeovers)

    def _begin(self, renew_at: int, seen: int = 0) -> None:
        self._frames = seen  # frames the current instance has seen (fed ones included)
        self._fed = 0  # frames given to the successor
        self._pending: list[np.ndarray] = []  # of those, the ones not sent yet
        self._renew_at = renew_at

    def __call__(self, data: np.ndarray) -> np.ndarray:
        if self._successor is not None:
            if self._successor_due():
                self._take_over()
            else:  # before the old instance runs: the successor has the whole frame to work in
                self._give(data)
        out = self._current.run(self.direction, data)
        self._frames += 1
        self.frames += 1
        if self._successor is None and self._frames >= self._renew_at and (
            self._spare_ready() or self._frames >= self.max_frames - 1
        ):
            self._successor = self._take_spare()  # fed from the next frame on
            self._successor_from = self.frames
        return out

    def _successor_due(self) -> bool:
        if self._fed >= self.overlap_frames + self.catch_up_frames or self._frames >= self.max_frames:
            self._send_pending()  # out of time to catch up, or the old instance out of life
            if not self._successor.caught_up():
                self.stalls += 1
            return True
        return self._fed >= self.overlap_frames and not self._pending and self._successor.caught_up()

    def _give(self, data: np.ndarray) -> None:
        """Chunks of `feed_chunk`, then (with what is buffered) each frame at once from
        `single_frames` before the end of the overlap."""
        self._pending.append(np.array(data))  # a copy: the caller may reuse its buffer
        self._fed += 1
        if len(self._pending) >= self.feed_chunk or self._fed > self.overlap_frames - self.single_frames:
            self._send_pending()

    def _send_pending(self) -> None:
        if self._pending:
            self._successor.feed(self.direction, np.stack(self._pending))
            self._pending = []

    def _spare_ready(self) -> bool:
        return self._spare is not None and self._spare.ready()

    def _take_spare(self) -> CodecInstance:
        spare = self._spare if self._spare is not None else self._start()
        self._spare = None
        if not spare.ready():
            self.waits += 1
        return spare

    def _take_over(self) -> None:
        self._send_pending()
        self._successor.sync()  # immediate when caught up; raises what went wrong while fed
        old, self._current, self._successor = self._current, self._successor, None
        self._retire(old)
        self.takeovers.append((self._successor_from, self.frames))
        self._begin(self.renewal_period, seen=self._fed)
        self._spare = self._start()  # builds while the new instance works

    def reset(self) -> None:
        """A fresh instance from the next frame on (exactly as a new coder would answer)."""
        fresh = self._take_spare()
        for instance in (self._current, self._successor):
            if instance is not None:
                instance.close()
        self._current, self._successor = fresh, None
        self._begin(self._first_renewal)
        self._spare = self._start()

    def _retire(self, instance: CodecInstance) -> None:
        """Close an instance replaced at a take-over, off this thread: a process takes 70-200 ms to end."""
        self._retiring = [t for t in self._retiring if t.is_alive()]
        thread = threading.Thread(target=instance.close, name="moshivis-mimi-retire", daemon=True)
        thread.start()
        self._retiring.append(thread)

    def wait_ready(self) -> None:
        """Wait until the current instance and the spare are built (a bad file fails here)."""
        for instance in (self._current, self._spare):
            if instance is not None:
                instance.wait_ready()

    def close(self) -> None:
        """Close every instance, retired ones included (their processes have ended on return)."""
        for instance in (self._current, self._successor, self._spare):
            if instance is not None:
                instance.close()
        self._successor = self._spare = None
        for thread in self._retiring:
            thread.join()
        self._retiring = []


class RenewingCodec:
    """Mimi with no length limit: an encoder and a decoder that renew themselves.

    The decoder's first renewal comes half a renewal period after the
    start, so the two directions never feed successors at the same time.
    `encode` and `decode` may run at the same time on two threads.
    """

    def __init__(self, start: Callable[[], CodecInstance], overlap_frames: int = RENEWAL_OVERLAP_FRAMES,
                 *, feed_chunk: int = FEED_CHUNK_FRAMES, sample_rate: int = MIMI_SAMPLE_RATE,
                 frame_size: int = MIMI_FRAME_SIZE, codebook_size: int = MIMI_CODEBOOK_SIZE,
                 num_codebooks: int = MIMI_NUM_CODEBOOKS):
        self.sample_rate = sample_rate
        self.frame_size = frame_size
        self.codebook_size = codebook_size
        self.num_codebooks = num_codebooks
        self.encoder = RenewingCoder(start, ENCODE, overlap_frames, feed_chunk=feed_chunk)
        try:
            half = max(overlap_frames, self.encoder.renewal_period // 2)
            self.decoder = RenewingCoder(start, DECODE, overlap_frames, first_renewal=half, feed_chunk=feed_chunk)
        except BaseException:
            self.encoder.close()
            raise
        self.max_frames = self.encoder.max_frames

    @property
    def renewals(self) -> int:
        return min(self.encoder.renewals, self.decoder.renewals)

    def encode(self, frame: np.ndarray) -> np.ndarray:
        return self.encoder(frame)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return self.decoder(codes)

    def reset(self) -> None:
        self.encoder.reset()
        self.decoder.reset()

    def wait_ready(self) -> None:
        """Wait until every instance is built, spares included, so a reset right after is immediate."""
        self.encoder.wait_ready()
        self.decoder.wait_ready()

    def close(self) -> None:
        """End the codec's processes (else they end when this process does)."""
        self.encoder.close()
        self.decoder.close()


def load_mimi(
    path: str | Path,
    num_codebooks: int = MIMI_NUM_CODEBOOKS,
    *,
    max_seq_len: int = MAX_SEQ_LEN,
    overlap_frames: int | None = None,
    feed_chunk: int = FEED_CHUNK_FRAMES,
) -> RenewingCodec:
    """Mimi from a checkpoint file (`tokenizer-e351c8d8-checkpoint125.safetensors`), with no length limit.

    `max_seq_len` sets an instance's life (`max_seq_len // 2` frames) and
    `overlap_frames` how long a successor is fed before it takes over
    (default: 30 s, or a quarter of a life when lives are short): small
    values make renewals quick to test. `feed_chunk` frames are fed to a
    successor per call (see `RenewingCoder`: 1 is frame by frame, at twice
    the CPU).
    """
    try:
        import importlib.util

        if importlib.util.find_spec("rustymimi") is None:
            raise ImportError("no module named 'rustymimi'")
    except ImportError as e:
        raise MimiError(f"the Mimi codec needs `rustymimi` (pip install rustymimi): {e}") from None
    path = _checked_path(path)
    life = max_seq_len // MIMI_STEPS_PER_FRAME
    if overlap_frames is None:
        overlap_frames = min(RENEWAL_OVERLAP_FRAMES, life // 4)
    codec = RenewingCodec(lambda: MimiProcess(path, num_codebooks, max_seq_len), overlap_frames,
                          feed_chunk=feed_chunk, num_codebooks=num_codebooks)
    try:
        codec.wait_ready()  # a bad file is reported here, not at the first frame
    except BaseException:
        codec.close()
        raise
    return codec


def _checked_path(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise MimiError(f"{path}: no such Mimi checkpoint file")
    return path


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
