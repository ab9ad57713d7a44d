"""Live mode: microphone -> MoshiVis -> speaker, in real time.

A feeder thread takes the microphone's audio, resamples it to 24 kHz and
pushes whole 80 ms frames into the conversation, whose Mimi encoder, model
and Mimi decoder work side by side (see `session.pipeline`); a receiver thread takes
the answers, in order, and queues them for the speaker. The PortAudio
callbacks only move audio through bounded buffers.

Echo cancellation (on by default) runs in the feeder, before a frame is
pushed: each microphone block is paired with what the speaker played while it
was captured, and `EchoCanceller` removes that from it, so the model (and the
recording's left channel) hears the user without its own voice. One
full-duplex stream gives the pairs directly (one callback, one clock); devices
that cannot share one run two streams, paired by their timestamps
(`PlaybackHistory`), where drifting clocks may let some echo through.

When the machine is slower than real time, the oldest waiting input frames
are dropped (and counted) so the lag stays under `max_lag`; when the speaker
runs dry it plays silence (counted as an underrun).

`sounddevice` (and so PortAudio) is imported on demand (`audio.devices`).
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..audio.devices import AudioDeviceError, describe_devices, device_name, device_sample_rate, find_device, import_sounddevice
from ..audio.framing import PendingFrames
from ..audio.resample import Resampler
from ..audio.wav import WavWriter

__all__ = ["AudioDeviceError", "LiveSession", "LiveStats", "OutputBuffer", "describe_devices", "device_sample_rate",
           "find_device", "import_sounddevice"]
from ..audio.echo import EchoCanceller, PlaybackHistory

DEFAULT_MAX_LAG_SECONDS = 0.5  # bound on (waiting input + queued output)
_INPUT_QUEUE_BLOCKS = 512  # safety bound on callback blocks not yet taken by the worker
_RECENT_STEPS = 25  # steps averaged for the real-time factor on the status line (2 s)
_POLL_SECONDS = 0.02  # worker wait for new input when idle
_WARMUP_STEPS = 2  # steps run (and forgotten) before the streams open, so the first real ones are not slow
_MAX_EVENT_TIMES = 100  # drops and underruns whose times are kept, for diagnosis
_MAX_IN_FLIGHT = 3  # frames in the conversation at once: one per stage keeps every stage busy
_MAX_OUTPUT_CHANNELS = 2  # mono is written to both channels of a stereo device
# Separate streams: the reference is taken this long after the capture time, as the
# output latency PortAudio reports may be overstated; AEC3 copes with an early
# reference (the echo canceller's own delay is ~9 ms), never with a late one.
_REFERENCE_MARGIN_SECONDS = 0.01
_ECHO_BACKEND_HINT = "the command line's --no-echo-cancel turns it off"


@dataclass
class LiveStats:
    """What happened, updated while running (read by the status line and the summary)."""

    input_rate: int = 0
    output_rate: int = 0
    seconds: float = 0.0  # since the streams opened
    captured_seconds: float = 0.0  # audio the microphone delivered
    played_seconds: float = 0.0  # model audio the speaker played
    steps: int = 0
    latency_seconds_total: float = 0.0  # from a frame's push to its answer
    latency_seconds_max: float = 0.0
    stage_seconds_total: dict = field(default_factory=dict)  # per stage: encode, model, decode
    dropped_frames: int = 0  # input frames skipped to keep the lag bounded
    underruns: int = 0  # speaker callbacks that found too little audio
    underrun_seconds: float = 0.0  # silence played instead
    input_overflows: int = 0  # microphone blocks lost before the worker saw them
    output_overflow_seconds: float = 0.0  # answers dropped because the speaker took them too slowly
    lag_seconds: float = 0.0
    max_lag_seconds: float = 0.0
    drop_times: list = field(default_factory=list)  # seconds since the streams opened, the first few
    underrun_times: list = field(default_factory=list)
    image_switches: int = 0
    image_switch_frames: list = field(default_factory=list)  # (frame when asked, first frame that saw it)
    echo_cancel: bool = False
    duplex: bool = False  # one full-duplex stream (one clock), not two
    echo_delay_ms: float | None = None  # the canceller's estimate (None: not known yet)
    reference_late: bool = False  # the speaker signal reached the canceller after its echo
    reference_resyncs: int = 0  # two streams: timestamp jumps the pairing had to follow
    echo_cancel_seconds: float = 0.0  # time spent cancelling echo ...
    echo_cancel_frames: float = 0.0  # ... for this many frames of audio
    recent_stage_seconds: collections.deque = field(default_factory=lambda: collections.deque(maxlen=_RECENT_STEPS))

    @property
    def mean_latency_seconds(self) -> float:
        return self.latency_seconds_total / self.steps if self.steps else 0.0

    def mean_stage_seconds(self) -> dict[str, float]:
        return {name: total / self.steps for name, total in self.stage_seconds_total.items()} if self.steps else {}

    def slowest_stage(self) -> tuple[str, float]:
        """The stage that sets the frame period, and its mean time per frame."""
        means = self.mean_stage_seconds()
        return max(means.items(), key=lambda kv: kv[1]) if means else ("", 0.0)

    def real_time_factor(self, frame_seconds: float) -> float:
        """The slowest stage's seconds per second of audio over the last steps (< 1 keeps up)."""
        recent = list(self.recent_stage_seconds)
        return (sum(recent) / len(recent)) / frame_seconds if recent else 0.0

    def count(self, output) -> None:
        """Account for one answered frame (a `FrameOutput`)."""
        self.steps += 1
        self.latency_seconds_total += output.latency
        self.latency_seconds_max = max(self.latency_seconds_max, output.latency)
        for name, seconds in output.stage_seconds.items():
            self.stage_seconds_total[name] = self.stage_seconds_total.get(name, 0.0) + seconds
        self.recent_stage_seconds.append(max(output.stage_seconds.values(), default=0.0))

    @property
    def echo_cancel_seconds_per_frame(self) -> float:
        return self.echo_cancel_seconds / self.echo_cancel_frames if self.echo_cancel_frames else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("recent_stage_seconds")
        out["mean_latency_seconds"] = self.mean_latency_seconds
        out["echo_cancel_seconds_per_frame"] = self.echo_cancel_seconds_per_frame
        out["mean_stage_seconds"] = self.mean_stage_seconds()
        return out


class OutputBuffer:
    """Samples for the speaker: a bounded FIFO shared by the worker and the callback."""

    def __init__(self, capacity: int):
        self._buf = np.zeros(max(1, capacity), np.float32)
        self._read = 0
        self._size = 0
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return self._size

    def push(self, samples: np.ndarray) -> int:
        """Append; returns how many of the oldest samples were dropped to make room."""
        cap = len(self._buf)
        too_many = max(0, len(samples) - cap)
        samples = samples[too_many:]
        with self._lock:
            dropped = too_many + max(0, self._size + len(samples) - cap)
            self._read = (self._read + dropped - too_many) % cap
            self._size -= dropped - too_many
            start = (self._read + self._size) % cap
            first = min(len(samples), cap - start)
            self._buf[start : start + first] = samples[:first]
            self._buf[: len(samples) - first] = samples[first:]
            self._size += len(samples)
        return dropped

    def pull(self, out: np.ndarray) -> int:
        """Fill `out` (1-D) from the FIFO, zeros where it runs dry; returns samples taken."""
        cap = len(self._buf)
        with self._lock:
            n = min(len(out), self._size)
            first = min(n, cap - self._read)
            out[:first] = self._buf[self._read : self._read + first]
            out[first:n] = self._buf[: n - first]
            self._read = (self._read + n) % cap
            self._size -= n
        out[n:] = 0.0
        return n


class TimedReference:
    """What the speaker played while each microphone block was captured, for two separate streams.

    The output callback records its blocks by DAC time, the input callback asks
    by ADC time plus a margin (see `_REFERENCE_MARGIN_SECONDS`). A reference
    block spans the microphone block's duration at the speaker's rate; lengths
    are counted over the whole stream, so rounding never accumulates.
    """

    def __init__(self, mic_rate: int, speaker_rate: int, margin: float = _REFERENCE_MARGIN_SECONDS):
        self.history = PlaybackHistory(speaker_rate)
        self.margin = margin
        self._ratio = speaker_rate / mic_rate
        self._mic_samples = 0
        self._ref_samples = 0

    def played(self, block: np.ndarray, dac_time: float) -> None:
        """Called by the output callback with what it gave the speaker."""
        self.history.add(block, dac_time)

    def heard(self, adc_time: float, frames: int) -> np.ndarray:
        """Called by the input callback: the reference for its `frames` samples, at the speaker's rate."""
        self._mic_samples += frames
        total = round(self._mic_samples * self._ratio)
        count, self._ref_samples = total - self._ref_samples, total
        return self.history.played_at(adc_time + self.margin, count)


class MicPath:
    """Microphone blocks, each with what the speaker played meanwhile -> the model's rate, echo removed.

    Microphone and speaker signal go through resamplers of the same kind, so a
    pair that starts aligned stays aligned. Every sample goes through the
    canceller, even those the lag bound drops later, so its echo path never
    sees a jump. Without a canceller the speaker signal is ignored.
    """

    def __init__(self, rate: int, mic_rate: int, speaker_rate: int, canceller: EchoCanceller | None):
        self.canceller = canceller
        self._mic = Resampler(mic_rate, rate)
        self._ref = Resampler(speaker_rate, rate)
        self._unit = round(rate * 0.01)  # the canceller takes whole 10 ms
        self._mic_wait = np.zeros(0, np.float32)  # resampled, not yet cancelled
        self._ref_wait = np.zeros(0, np.float32)
        self.seconds = 0.0  # time spent in the canceller
        self.samples = 0  # samples it cleaned

    def process(self, mic: np.ndarray, played: np.ndarray | None) -> np.ndarray:
        """The cleaned samples ready so far (at the model's rate)."""
        if self.canceller is None:
            return self._mic.process(mic)
        if played is None:
            raise ValueError("echo cancellation needs what the speaker played with each microphone block")
        self._mic_wait = np.concatenate([self._mic_wait, self._mic.process(mic)])
        self._ref_wait = np.concatenate([self._ref_wait, self._ref.process(played)])
        count = min(len(self._mic_wait), len(self._ref_wait)) // self._unit * self._unit
        if count == 0:
            return np.zeros(0, np.float32)
        started = time.perf_counter()
        cleaned = self.canceller.process(self._mic_wait[:count], self._ref_wait[:count])
        self.seconds += time.perf_counter() - started
        self.samples += count
        self._mic_wait, self._ref_wait = self._mic_wait[count:], self._ref_wait[count:]
        return cleaned


def make_canceller(rate: int) -> EchoCanceller:
    """An `EchoCanceller`, or an `AudioDeviceError` that says how to do without."""
    try:
        return EchoCanceller(rate)
    except ImportError as e:
        raise AudioDeviceError(f"{e}; {_ECHO_BACKEND_HINT}") from None


class LiveSession:
    """Runs a `Conversation` against a microphone and a speaker until `stop()`.

    With `echo_cancel` (the default) the model hears the microphone without the
    echo of its own voice; `canceller` replaces the default `EchoCanceller`.
    """

    def __init__(
        self,
        conversation,
        sd,
        *,
        input_device: str | int | None = None,
        output_device: str | int | None = None,
        max_lag_seconds: float = DEFAULT_MAX_LAG_SECONDS,
        record: str | Path | None = None,
        step_delay: float = 0.0,
        echo_cancel: bool = True,
        canceller: EchoCanceller | None = None,
    ):
        self.conversation = conversation
        self.sd = sd
        self.rate = conversation.sample_rate
        self.frame_size = conversation.frame_size
        self.frame_seconds = self.frame_size / self.rate
        if max_lag_seconds < self.frame_seconds:
            raise ValueError(f"max lag must be at least one frame ({self.frame_seconds:.2f} s), got {max_lag_seconds}")
        self.max_lag_seconds = max_lag_seconds
        self.step_delay = step_delay  # debugging aid: pretend the machine is slower
        self.input_device = find_device(sd, input_device, "input")
        self.output_device = find_device(sd, output_device, "output")
        self.canceller = (canceller or make_canceller(self.rate)) if echo_cancel else None
        self.stats = LiveStats(echo_cancel=self.canceller is not None)
        self._record_path = record
        self._recorder: WavWriter | None = None
        self._input: queue.Queue[tuple[np.ndarray, np.ndarray | None]] = queue.Queue(maxsize=_INPUT_QUEUE_BLOCKS)
        self._pending = PendingFrames(self.frame_size, self.rate)  # input at 24 kHz (echo removed)
        self._playing = False
        self.events: queue.Queue[tuple[str, str]] = queue.Queue()  # ("text", piece) or ("info", message)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._streams: list = []
        self._started_at = 0.0
        self.error: BaseException | None = None

    def _configure(self, mic_rate: int, speaker_rate: int, duplex: bool) -> None:
        """What depends on the device rates, set once the streams are open and before they start."""
        self.stats.input_rate, self.stats.output_rate, self.stats.duplex = mic_rate, speaker_rate, duplex
        self._mic_path = MicPath(self.rate, mic_rate, speaker_rate, self.canceller)
        self._reference = None if duplex or self.canceller is None else TimedReference(mic_rate, speaker_rate)
        self._to_speaker = Resampler(self.rate, speaker_rate)
        self._output = OutputBuffer(int(self.max_lag_seconds * speaker_rate))

    # -- control -------------------------------------------------------------

    def start(self) -> None:
        """Warm up, open and start the streams, then the threads that feed the conversation."""
        self._warm_up()
        self._open_streams()
        if self._record_path is not None:
            self._recorder = WavWriter(self._record_path, self.rate, channels=2)
        self._started_at = time.perf_counter()
        self._threads = [
            threading.Thread(target=self._guarded, args=(self._feed,), name="moshivis-feed", daemon=True),
            threading.Thread(target=self._guarded, args=(self._receive,), name="moshivis-receive", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _open_streams(self) -> None:
        """One full-duplex stream if the devices allow it, else two; running, or none and an error."""
        out_channels = min(_MAX_OUTPUT_CHANNELS, int(self.sd.query_devices(self.output_device)["max_output_channels"]))
        if not self._open_duplex(out_channels):
            self._open_separate(out_channels)

    def _duplex_rates(self, out_channels: int) -> list[int]:
        """Rates both devices take, best first: the model's (no resampling), then the devices' own."""
        sd = self.sd
        candidates = [self.rate] + [
            int(sd.query_devices(device)["default_samplerate"]) for device in (self.input_device, self.output_device)
        ]
        rates = []
        for rate in dict.fromkeys(candidates):
            try:
                sd.check_input_settings(device=self.input_device, samplerate=rate, channels=1, dtype="float32")
                sd.check_output_settings(device=self.output_device, samplerate=rate, channels=out_channels,
                                         dtype="float32")
            except Exception:  # PortAudioError or ValueError: not at this rate
                continue
            rates.append(rate)
        return rates

    def _open_duplex(self, out_channels: int) -> bool:
        """One stream for both directions (one clock, blocks paired by the callback), if any rate works."""
        sd = self.sd
        for rate in self._duplex_rates(out_channels):
            try:
                stream = sd.Stream(
                    device=(self.input_device, self.output_device), samplerate=rate, channels=(1, out_channels),
                    dtype="float32", latency="low", callback=self._on_duplex,
                )
            except (sd.PortAudioError, ValueError, OSError):
                continue  # e.g. devices of different host APIs: try another rate, then two streams
            self._streams.append(stream)
            self._configure(rate, rate, duplex=True)
            try:
                stream.start()
                return True
            except (sd.PortAudioError, ValueError, OSError):
                self._close_streams()
        return False

    def _open_separate(self, out_channels: int) -> None:
        """Both streams open and running, or none and an `AudioDeviceError` naming the device."""
        sd = self.sd
        devices = {"input": self.input_device, "output": self.output_device}
        mic_rate = device_sample_rate(sd, self.input_device, "input", self.rate)
        speaker_rate = device_sample_rate(sd, self.output_device, "output", self.rate)
        kind = "input"
        try:
            self._streams.append(sd.InputStream(
                device=self.input_device, samplerate=mic_rate, channels=1, dtype="float32",
                latency="low", callback=self._on_input,
            ))
            kind = "output"
            self._streams.append(sd.OutputStream(
                device=self.output_device, samplerate=speaker_rate, channels=out_channels,
                dtype="float32", latency="low", callback=self._on_output,
            ))
            self._configure(mic_rate, speaker_rate, duplex=False)
            for kind, stream in zip(("input", "output"), self._streams):
                stream.start()
        except (sd.PortAudioError, ValueError, OSError) as e:
            self._close_streams()
            name = device_name(sd, devices[kind])
            raise AudioDeviceError(f"cannot start the audio {kind} device {devices[kind]} ({name}): {e}") from None

    def stop(self) -> None:
        """Close the streams, let the threads finish, finish the recording."""
        self._close_streams()
        self._stop.set()
        for thread in self._threads:
            thread.join()
        self.stats.seconds = time.perf_counter() - self._started_at if self._started_at else 0.0
        if self._recorder is not None:
            self._recorder.close()

    @property
    def running(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def request_image(self, image, label: str) -> None:
        """Switch the picture; the conversation goes on while it is embedded."""
        asked_at = self.conversation.frames_pushed
        try:
            applied = self.conversation.set_image(image, wait=False)
        except Exception as e:  # closed, or stopped
            self.events.put(("info", f"cannot use {label}: {e}"))
            return
        self.events.put(("info", f"preparing {label}..."))
        applied.add_done_callback(lambda done: self._image_applied(done, label, asked_at))

    def _image_applied(self, done, label: str, asked_at: int) -> None:
        error = done.exception()
        if error is not None:  # a bad picture must not end the conversation
            self.events.put(("info", f"cannot use {label}: {error}"))
        else:
            self.stats.image_switches += 1
            self.stats.image_switch_frames.append((asked_at, done.result()))
            self.events.put(("info", f"now looking at {label} (from frame {done.result()})"))

    def elapsed(self) -> float:
        return time.perf_counter() - self._started_at if self._started_at else 0.0

    # -- audio callbacks (PortAudio's threads: no MLX, no allocation beyond a copy) --

    def _on_duplex(self, indata, outdata, frames, time_info, status) -> None:
        """Both directions at once: the microphone block goes with the block played in the same call."""
        self._count_input(frames, status)
        played = self._play(outdata, frames)
        self._queue_input(indata[:, 0].copy(), played)

    def _on_input(self, indata, frames, time_info, status) -> None:
        self._count_input(frames, status)
        played = None
        if self._reference is not None:
            played = self._reference.heard(time_info.inputBufferAdcTime or time_info.currentTime, frames)
        self._queue_input(indata[:, 0].copy(), played)

    def _on_output(self, outdata, frames, time_info, status) -> None:
        played = self._play(outdata, frames)
        if self._reference is not None:
            self._reference.played(played, time_info.outputBufferDacTime or time_info.currentTime)

    def _count_input(self, frames: int, status) -> None:
        if status.input_overflow:
            self.stats.input_overflows += 1
        self.stats.captured_seconds += frames / self.stats.input_rate

    def _queue_input(self, mic: np.ndarray, played: np.ndarray | None) -> None:
        try:
            self._input.put_nowait((mic, played))
        except queue.Full:  # the feeder is stuck; the lag bound would drop this audio anyway
            self.stats.input_overflows += 1

    def _play(self, outdata, frames: int) -> np.ndarray:
        """Fill `outdata` from the answers (silence where they ran dry); returns the mono block played."""
        mono = np.empty(frames, np.float32)
        taken = self._output.pull(mono)
        outdata[:] = mono[:, None]
        if self._playing:
            self.stats.played_seconds += taken / self.stats.output_rate
            if taken < frames:
                self.stats.underruns += 1
                if len(self.stats.underrun_times) < _MAX_EVENT_TIMES:
                    self.stats.underrun_times.append(round(self.elapsed(), 2))
                self.stats.underrun_seconds += (frames - taken) / self.stats.output_rate
        return mono

    # -- the two threads -----------------------------------------------------------

    def _warm_up(self) -> None:
        silence = np.zeros(self.frame_size, np.float32)
        for _ in range(_WARMUP_STEPS):
            self.conversation.step(silence)
        self.conversation.reset()

    def _guarded(self, loop) -> None:
        try:
            loop()
        except BaseException as e:  # reported by the main thread
            self.error = self.error or e
            self._stop.set()

    def _feed(self) -> None:
        """Microphone -> whole frames -> the conversation, at most `_MAX_IN_FLIGHT` at once."""
        while not self._stop.is_set():
            self._take_input()
            while self.conversation.in_flight < _MAX_IN_FLIGHT:
                frame = self._next_frame()
                if frame is None:
                    break
                self.conversation.push(frame)
                if self.step_delay:
                    time.sleep(self.step_delay)

    def _receive(self) -> None:
        """Answers -> the speaker (and the recording, and the transcript)."""
        while not self._stop.is_set():
            try:
                out = self.conversation.receive(timeout=_POLL_SECONDS)
            except TimeoutError:
                continue
            self.stats.count(out)
            if self._recorder is not None:
                self._recorder.write(np.stack([out.pcm_in, out.pcm], axis=1))
            dropped = self._output.push(self._to_speaker.process(out.pcm))
            self.stats.output_overflow_seconds += dropped / self.stats.output_rate
            self._playing = True
            if out.text:
                self.events.put(("text", out.text))

    def _take_input(self) -> None:
        """Move every queued microphone block into `_pending` (at 24 kHz, echo removed)."""
        blocks = []
        try:
            if not self._pending.has_frame:  # nothing to do until more audio comes
                blocks.append(self._input.get(timeout=_POLL_SECONDS))
            while True:
                blocks.append(self._input.get_nowait())
        except queue.Empty:
            pass
        if blocks:
            mic = np.concatenate([b[0] for b in blocks])
            played = None if blocks[0][1] is None else np.concatenate([b[1] for b in blocks])
            self._pending.append(self._mic_path.process(mic, played))
            self._note_echo()
        elif self._pending.has_frame:
            time.sleep(_POLL_SECONDS / 4)  # frames wait for room in the conversation

    def _note_echo(self) -> None:
        """Copy the canceller's state to the stats; say once if the reference comes too late."""
        if self.canceller is None:
            return
        stats = self.stats
        stats.echo_cancel_seconds = self._mic_path.seconds
        stats.echo_cancel_frames = self._mic_path.samples / self.frame_size
        stats.echo_delay_ms = self.canceller.echo_delay_ms
        if self._reference is not None:
            stats.reference_resyncs = self._reference.history.resyncs
        if self.canceller.reference_late and not stats.reference_late:
            self.events.put(("info", "echo cancellation cannot work: the speaker signal reaches it after its echo"))
        stats.reference_late = self.canceller.reference_late

    def _current_lag(self) -> float:
        """Audio heard but not yet answered (waiting or in the conversation), plus answers not yet played."""
        waiting = self._pending.seconds + self.conversation.in_flight * self.frame_seconds
        return waiting + self._output.size / self.stats.output_rate

    def _next_frame(self) -> np.ndarray | None:
        """The oldest whole frame, after dropping the oldest ones beyond the lag bound."""
        frame, dropped, lag = self._pending.next_frame(self._current_lag, self.max_lag_seconds)
        if frame is None:
            return None
        if dropped:
            self.stats.dropped_frames += dropped
            if len(self.stats.drop_times) < _MAX_EVENT_TIMES:
                self.stats.drop_times.append(round(self.elapsed(), 2))
        self.stats.lag_seconds = lag
        self.stats.max_lag_seconds = max(self.stats.max_lag_seconds, lag)
        return frame

    def _close_streams(self) -> None:
        for stream in self._streams:
            try:
                stream.stop()
                stream.close()
            except Exception:  # closing must go on for the other stream and the files
                pass
        self._streams = []

