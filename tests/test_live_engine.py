"""Live mode's start against audio devices that fail: a clear error, nothing left open."""

from __future__ import annotations

import numpy as np
import pytest

from moshivis_mlx.app.live import AudioDeviceError, LiveSession


class PortAudioError(Exception):
    pass


class FakeStream:
    """Records its life; `fail_on` names the call that raises ("open" or "start")."""

    made: list["FakeStream"] = []
    fail_on: dict[str, str] = {}  # kind of stream ("input", "output", "duplex") -> failing call

    def __init__(self, kind: str, **kwargs):
        self.kind, self.started, self.closed = kind, False, False
        if FakeStream.fail_on.get(kind) == "open":
            raise PortAudioError(f"Error opening {kind} stream: Invalid sample rate [PaErrorCode -9997]")
        FakeStream.made.append(self)

    def start(self):
        if FakeStream.fail_on.get(self.kind) == "start":
            raise PortAudioError("Error starting stream: Device unavailable [PaErrorCode -9985]")
        self.started = True

    def stop(self):
        self.started = False

    def close(self):
        self.closed = True


class FakeSoundDevice:
    """The parts of `sounddevice` live mode uses: one microphone, one speaker."""

    PortAudioError = PortAudioError

    class default:  # noqa: N801 (sounddevice's name)
        device = (0, 1)

    _devices = [
        {"index": 0, "name": "Built-in Microphone", "max_input_channels": 1, "max_output_channels": 0,
         "default_samplerate": 48000.0},
        {"index": 1, "name": "Built-in Speakers", "max_input_channels": 0, "max_output_channels": 2,
         "default_samplerate": 48000.0},
    ]

    def query_devices(self, device=None):
        return self._devices if device is None else self._devices[device]

    def check_input_settings(self, **kwargs):
        pass

    check_output_settings = check_input_settings

    def InputStream(self, **kwargs):  # noqa: N802
        return FakeStream("input", **kwargs)

    def OutputStream(self, **kwargs):  # noqa: N802
        return FakeStream("output", **kwargs)

    def Stream(self, **kwargs):  # noqa: N802 (a full-duplex stream, where live mode opens one)
        return FakeStream("duplex", **kwargs)


class StubConversation:
    sample_rate, frame_size = 24000, 1920

    def __init__(self):
        self.pushed = 0

    def step(self, frame):
        return np.zeros(self.frame_size, np.float32), ""

    def reset(self):
        pass

    def push(self, frame):
        self.pushed += 1


@pytest.mark.parametrize("fail_on", [
    {"input": "start", "duplex": "start"},
    {"output": "start", "duplex": "start"},
    {"output": "open", "duplex": "open"},
    {"input": "open", "duplex": "open"},
])
def test_a_stream_that_fails_to_open_or_start_is_named_and_nothing_stays_open(tmp_path, fail_on):
    FakeStream.made, FakeStream.fail_on = [], fail_on
    conversation = StubConversation()
    record = tmp_path / "talk.wav"
    session = LiveSession(conversation, FakeSoundDevice(), record=record)
    with pytest.raises(AudioDeviceError, match=r"cannot start the audio (input|output) device \d \(Built-in") as e:
        session.start()
    failing = "input" if "input" in fail_on else "output"
    assert f"audio {failing} device" in str(e.value) or "duplex" in fail_on
    assert all(stream.closed and not stream.started for stream in FakeStream.made)
    assert not session.running and conversation.pushed == 0  # no thread was started
    assert not record.exists()  # no half-written recording
