"""Audio devices through `sounddevice` (PortAudio): finding them, their rates, clear errors.

`sounddevice` is imported only on demand: PortAudio is missing on a bare
Linux, and file mode, the web page and `doctor` must work without it.
"""

from __future__ import annotations


class AudioDeviceError(RuntimeError):
    """No usable audio library or device."""


def import_sounddevice():
    """`sounddevice`, or an error that says how to get PortAudio."""
    try:
        import sounddevice
    except OSError as e:  # raised at import when the PortAudio library is missing
        raise AudioDeviceError(
            f"PortAudio was not found ({e}). Live mode needs it for the microphone and speaker. "
            "macOS: pip install --force-reinstall sounddevice (its wheel includes PortAudio); "
            "Debian/Ubuntu: sudo apt-get install libportaudio2. "
            "File mode (--input question.wav --output answer.wav) works without it."
        ) from None
    except ImportError as e:
        raise AudioDeviceError(f"live mode needs the `sounddevice` package (pip install sounddevice): {e}") from None
    return sounddevice


def describe_devices(sd) -> str:
    """The device list, as `--list-devices` prints it."""
    try:
        devices = sd.query_devices()
    except sd.PortAudioError as e:
        raise AudioDeviceError(f"cannot list audio devices: {e}") from None
    if len(devices) == 0:
        return "no audio devices found"
    return str(devices) + "\n(> default input, < default output; pass a number or part of a name to --input-device / --output-device)"


def find_device(sd, spec: str | int | None, kind: str) -> int:
    """Index of the device named by `spec` (index, or part of its name), or the default one."""
    channels_key = f"max_{kind}_channels"
    devices = list(sd.query_devices())
    usable = [d for d in devices if d[channels_key] > 0]
    if not usable:
        raise AudioDeviceError(
            f"no audio {kind} device found: connect a {'microphone' if kind == 'input' else 'speaker or headphones'}"
            " (see --list-devices)"
        )
    if spec is None or spec == "":
        default = sd.default.device[0 if kind == "input" else 1]
        if default is not None and 0 <= int(default) < len(devices) and devices[int(default)][channels_key] > 0:
            return int(default)
        return int(usable[0]["index"])
    text = str(spec).strip()
    if text.isdigit():
        index = int(text)
        if index >= len(devices) or devices[index][channels_key] == 0:
            raise AudioDeviceError(f"device {index} is not an audio {kind} device (see --list-devices)")
        return index
    matches = [d for d in usable if text.lower() in d["name"].lower()]
    if len(matches) != 1:
        found = "no" if not matches else f"{len(matches)}"
        names = ", ".join(f"{d['index']}: {d['name']}" for d in (matches or usable))
        raise AudioDeviceError(f"{found} {kind} devices match {text!r} ({names}); pass a number from --list-devices")
    return int(matches[0]["index"])


def device_sample_rate(sd, device: int, kind: str, preferred: int) -> int:
    """`preferred` if the device runs at it, else the device's own rate (we resample)."""
    check = sd.check_input_settings if kind == "input" else sd.check_output_settings
    try:
        check(device=device, samplerate=preferred, channels=1, dtype="float32")
        return preferred
    except Exception:  # PortAudioError or ValueError: rate not supported
        return int(sd.query_devices(device)["default_samplerate"])


def device_name(sd, device: int) -> str:
    try:
        return str(sd.query_devices(device)["name"])
    except Exception:
        return "unknown device"
