"""Acoustic echo cancellation, so the model can be heard through loudspeakers.

Without it the model hears its own voice from the speaker and answers itself.
`EchoCanceller` removes from each microphone block the echo of what the speaker
played; the work is done by WebRTC's AEC3 (the browsers' echo canceller) as
packaged by `livekit` (Apache-2.0, wheels for macOS arm64 and Linux), imported
only when a canceller is made.

AEC3 needs the speaker signal to reach it no later than its echo reaches the
microphone; it then finds delays up to ~450 ms by itself. A late reference
leaves most of the echo in place, so the canceller also estimates the echo
delay and flags a late reference (`echo_delay_ms`, `reference_late`).
`PlaybackHistory` pairs microphone and speaker blocks by their stream
timestamps when they come from two separate streams.

Limits (measured in tests/test_echo.py): while both talk AEC3 lowers the user
by ~8-10 dB, as browsers do; the cleaned signal lags the microphone by ~9 ms
(the backend's band splitting), and loses what is below ~100 Hz and, at 24 kHz,
above ~10 kHz; devices whose clocks drift apart (Bluetooth, two interfaces)
defeat any echo canceller.
"""

from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass

import numpy as np

FRAME_SECONDS = 0.01  # AEC3 consumes 10 ms frames
MIN_RATE, MAX_RATE = 8000, 384000  # what WebRTC's audio processing accepts
INT16_SCALE = 32767.0  # float [-1, 1] <-> int16, symmetric so a round trip is exact
LATE_TOLERANCE_MS = 1.0  # an echo estimated this much before its reference counts as late

_MISSING_BACKEND = (
    "Echo cancellation needs WebRTC's echo canceller from the 'livekit' package: "
    "pip install livekit (or turn echo cancellation off and use headphones)."
)


@dataclass(frozen=True)
class DelayConfig:
    """How the echo delay is watched: cross-correlation of microphone and speaker over a window.

    The estimate only reports (AEC3 finds the delay itself); it exists to catch a
    reference that arrives after its echo, which no echo canceller can remove.
    """

    window: float = 2.0  # seconds of microphone and reference compared at once
    every: float = 0.5  # seconds of audio between two estimates
    max_delay: float = 0.6  # longest echo delay searched (s)
    max_late: float = 0.3  # longest reference lateness searched (s)
    analysis_rate: int = 4000  # Hz: speech's correlation peak needs no more
    band: tuple[float, float] = (250.0, 1800.0)  # Hz weighted: above small speakers' cutoff, below Nyquist
    min_score: float = 8.0  # correlation peak over its rms needed to trust an estimate
    min_uniqueness: float = 1.3  # peak over the next peak (beyond `exclusion`): periodic sounds are ambiguous
    exclusion: float = 0.002  # s around the peak that belong to it
    agree: float = 0.002  # s: two trusted estimates in a row must agree this well to be reported
    min_level: float = 1e-3  # reference rms (-60 dBFS) below which nothing is learned


class EchoCanceller:
    """Removes the speaker's echo from the microphone, block by block.

    `process(mic, played)` takes float32 blocks of equal length, a multiple of
    10 ms; `played` must be exactly what went to the speaker while `mic` was
    captured (silence where the output ran dry). With one full-duplex stream the
    two blocks of a callback pair up; with two streams use `PlaybackHistory`.
    One canceller serves one conversation from one thread at a time.
    """

    def __init__(self, sample_rate: int = 24000, *, delay: DelayConfig | None = DelayConfig()):
        if int(sample_rate) != sample_rate or not MIN_RATE <= sample_rate <= MAX_RATE or sample_rate % 100:
            raise ValueError(
                f"EchoCanceller needs a sample rate of {MIN_RATE}-{MAX_RATE} Hz with a whole number of "
                f"samples per 10 ms (a multiple of 100 Hz), got {sample_rate}; resample to 24000 first"
            )
        self.sample_rate = int(sample_rate)
        self.frame = round(self.sample_rate * FRAME_SECONDS)  # samples per AEC3 frame
        self._rtc = _load_backend()
        self.backend = f"webrtc-aec3 (livekit {self._rtc.__version__})"
        # One 10 ms buffer per direction, shared with the backend's frames: no allocation per frame.
        self._ref_bytes, self._mic_bytes = bytearray(2 * self.frame), bytearray(2 * self.frame)
        self._ref16 = np.frombuffer(self._ref_bytes, np.int16)
        self._mic16 = np.frombuffer(self._mic_bytes, np.int16)
        self._ref_frame = self._rtc.AudioFrame(self._ref_bytes, self.sample_rate, 1, self.frame)
        self._mic_frame = self._rtc.AudioFrame(self._mic_bytes, self.sample_rate, 1, self.frame)
        self._delay_config = delay
        self.reset()

    def reset(self) -> None:
        """Forget the echo path (a new conversation, or devices changed)."""
        # Echo cancellation only: noise suppression and gain control would also change the user's voice.
        self._apm = self._rtc.AudioProcessingModule(echo_cancellation=True)
        self._delay = None if self._delay_config is None else DelayEstimator(self.sample_rate, self._delay_config)
        self._warned_late = False

    @property
    def echo_delay_ms(self) -> float | None:
        """Latest estimate of how long after its reference the echo reaches the microphone (None: unknown).

        Negative means the reference arrives late: the echo cannot be removed.
        """
        return None if self._delay is None else self._delay.delay_ms

    @property
    def reference_late(self) -> bool:
        """True when the speaker signal reaches the canceller after its echo (see `echo_delay_ms`)."""
        delay = self.echo_delay_ms
        return delay is not None and delay < -LATE_TOLERANCE_MS

    def process(self, mic: np.ndarray, played: np.ndarray) -> np.ndarray:
        """The microphone block without the echo of `played`, as float32."""
        mic, played = _as_block(mic, "mic"), _as_block(played, "played")
        if len(mic) != len(played):
            raise ValueError(f"mic and played must have the same length, got {len(mic)} and {len(played)}")
        if len(mic) % self.frame:
            raise ValueError(
                f"blocks must be a multiple of 10 ms ({self.frame} samples at {self.sample_rate} Hz), got {len(mic)}"
            )
        if self._delay is not None:
            self._delay.push(mic, played)
            if self.reference_late and not self._warned_late:
                self._warned_late = True
                warnings.warn(
                    f"the speaker signal reaches the echo canceller {-self.echo_delay_ms:.0f} ms after its echo, "
                    "so the echo stays: pair each microphone block with what was playing while it was captured",
                    RuntimeWarning,
                    stacklevel=2,
                )
        mic16, ref16 = _to_int16(mic), _to_int16(played)
        out = np.empty(len(mic), np.int16)
        for start in range(0, len(mic), self.frame):
            stop = start + self.frame
            # The reference goes first: AEC3 can only cancel echo of what it has already seen.
            self._ref16[:] = ref16[start:stop]
            self._apm.process_reverse_stream(self._ref_frame)
            self._mic16[:] = mic16[start:stop]
            self._apm.process_stream(self._mic_frame)  # in place
            out[start:stop] = self._mic16
        return out.astype(np.float32) / np.float32(INT16_SCALE)


class DelayEstimator:
    """Estimates the echo delay by band-limited GCC-PHAT over a sliding window.

    Phase-transform weighting turns speech's broad correlation into a sharp
    peak at the direct path. Estimates are only made while the speaker plays,
    and only a clear, unique peak found twice in a row is reported.
    """

    def __init__(self, sample_rate: int, config: DelayConfig = DelayConfig()):
        self.config = config
        self._factor = max(1, round(sample_rate / config.analysis_rate))  # decimation by block means
        self._rate = sample_rate / self._factor
        window = int(config.window * sample_rate) // self._factor * self._factor
        self._mic = np.zeros(window, np.float32)  # newest samples last
        self._ref = np.zeros(window, np.float32)
        self._filled = 0
        self._since = 0
        self._every = max(1, int(config.every * sample_rate))
        self._nfft = 1 << math.ceil(math.log2(2 * window // self._factor))  # no circular wrap-around
        freqs = np.fft.rfftfreq(self._nfft, 1.0 / self._rate)
        self._band = (freqs >= config.band[0]) & (freqs <= config.band[1])
        self._max_lag = int(config.max_delay * self._rate)
        self._max_lead = int(config.max_late * self._rate)
        self.delay_ms: float | None = None
        self._candidate: float | None = None  # the last trusted estimate, awaiting confirmation
        self.score = 0.0  # peak over rms of the last correlation
        self.uniqueness = 0.0  # peak over the next peak of the last correlation

    def push(self, mic: np.ndarray, ref: np.ndarray) -> None:
        """Adds a block of microphone and reference; estimates again every `config.every` seconds."""
        n = min(len(mic), len(self._mic))
        if n == 0:
            return
        for buf, x in ((self._mic, mic), (self._ref, ref)):
            buf[:-n] = buf[n:]
            buf[-n:] = x[-n:]
        self._filled = min(len(self._mic), self._filled + len(mic))
        self._since += len(mic)
        if self._filled == len(self._mic) and self._since >= self._every:
            self._since = 0
            self._estimate()

    def _estimate(self) -> None:
        mic = self._mic.reshape(-1, self._factor).mean(axis=1)
        ref = self._ref.reshape(-1, self._factor).mean(axis=1)
        if float(np.sqrt(np.mean(ref * ref))) < self.config.min_level:
            return  # the speaker is silent: nothing to learn, keep the last estimate
        cross = np.fft.rfft(mic, self._nfft) * np.conj(np.fft.rfft(ref, self._nfft))
        weighted = np.where(self._band, cross / (np.abs(cross) + 1e-20), 0.0)
        corr = np.fft.irfft(weighted, self._nfft)
        # Lags -max_lead..max_lag: positive when the echo comes after its reference.
        search = np.concatenate([corr[self._nfft - self._max_lead :], corr[: self._max_lag + 1]])
        peak = int(np.argmax(search))
        rms = float(np.sqrt(np.mean(search * search)))
        self.score = float(search[peak]) / rms if rms > 0 else 0.0
        near = int(self.config.exclusion * self._rate)
        others = np.concatenate([search[: max(0, peak - near)], search[peak + near + 1 :]])
        self.uniqueness = float(search[peak] / others.max()) if len(others) and others.max() > 0 else np.inf
        if self.score < self.config.min_score or self.uniqueness < self.config.min_uniqueness:
            return
        delay_ms = 1000.0 * (peak - self._max_lead) / self._rate
        if self._candidate is not None and abs(delay_ms - self._candidate) <= 1000.0 * self.config.agree:
            self.delay_ms = delay_ms
        self._candidate = delay_ms


class PlaybackHistory:
    """What the speaker played, by time: finds the reference for a microphone block.

    For separate input and output streams (no full-duplex stream): the output
    callback calls `add(block, time.outputBufferDacTime)`, the input callback
    `played_at(time.inputBufferAdcTime, len(block))`. Both times must come from
    the same clock (PortAudio's stream time of one host API). Blocks that follow
    the previous one (output) or the previous request (input) within `jitter`
    are kept contiguous, so timestamp noise never cuts the reference; larger
    jumps (an underrun, clocks drifting apart) re-anchor and count in
    `resyncs`. Callers worried about an overstated output latency can ask for
    `adc_time + margin`: AEC3 tolerates a reference that is early, not a late one.
    """

    def __init__(self, sample_rate: int = 24000, *, seconds: float = 2.0, jitter: float = 0.001):
        self.sample_rate = int(sample_rate)
        self._buf = np.zeros(max(1, int(seconds * sample_rate)), np.float32)  # ring, by absolute sample index
        self._jitter = jitter * sample_rate
        self._lock = threading.Lock()  # add and played_at run on different audio threads
        self.clear()

    def clear(self) -> None:
        """Forgets everything played."""
        with self._lock:
            self._origin: float | None = None  # time of absolute sample 0
            self._begin = 0  # first absolute sample index still held
            self._end = 0  # one past the last sample written
            self._next_read: int | None = None  # where the microphone's next block should start
            self.resyncs = 0

    def add(self, block: np.ndarray, dac_time: float) -> None:
        """Records `block`, whose first sample reaches the speaker at `dac_time` (seconds)."""
        block = np.asarray(block, np.float32).reshape(-1)
        cap = len(self._buf)
        with self._lock:
            if self._origin is None:
                self._origin, start = dac_time, 0
            else:
                start = round((dac_time - self._origin) * self.sample_rate)
                if abs(start - self._end) <= self._jitter:
                    start = self._end  # the next block: absorb timestamp jitter
                else:
                    self.resyncs += 1
            if start > self._end:  # nothing played in between: silence
                gap_from = max(self._end, start - cap)
                self._buf[np.arange(gap_from, start) % cap] = 0.0
            if len(block) > cap:
                start, block = start + len(block) - cap, block[-cap:]
            self._buf[np.arange(start, start + len(block)) % cap] = block
            self._end = start + len(block)
            self._begin = max(min(self._begin, start), self._end - cap)

    def played_at(self, adc_time: float, num_samples: int) -> np.ndarray:
        """The `num_samples` on the speaker from `adc_time` on; silence where nothing is known."""
        out = np.zeros(num_samples, np.float32)
        with self._lock:
            if self._origin is None:
                return out
            first = round((adc_time - self._origin) * self.sample_rate)
            if self._next_read is not None:
                if abs(first - self._next_read) <= self._jitter:
                    first = self._next_read  # the microphone's next block: absorb timestamp jitter
                else:
                    self.resyncs += 1
            self._next_read = first + num_samples
            lo, hi = max(first, self._begin), min(first + num_samples, self._end)
            if hi > lo:
                out[lo - first : hi - first] = self._buf[np.arange(lo, hi) % len(self._buf)]
        return out


def _load_backend():
    try:
        from livekit import rtc
    except ImportError as e:
        raise ImportError(_MISSING_BACKEND) from e
    return rtc


def _as_block(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of mono samples, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name} must hold float samples in [-1, 1], got {x.dtype}")
    return x.astype(np.float32, copy=False)


def _to_int16(x: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(x, -1.0, 1.0) * INT16_SCALE).astype(np.int16)
