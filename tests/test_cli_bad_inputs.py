"""Inputs a new user gets wrong, and what the CLI says about them: a directory
or a mistyped time given to --image, a WAV file cut short."""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest

from moshivis_mlx.audio.wav import write_wav
from moshivis_mlx.app.cli import UsageError, parse_image_switches, read_question
from test_cli import assert_clean_error, run_cli


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(b"checked later, when loaded")
    return path


def truncated_wav(path, seconds_held: float, seconds_promised: float, rate: int = 24000) -> None:
    """A 16-bit mono WAV whose 'data' size promises more than the file holds (a cut-off copy)."""
    write_wav(path, np.zeros(round(seconds_held * rate), np.float32), rate)
    data = bytearray(path.read_bytes())
    at = data.index(b"data") + 4
    data[at : at + 4] = struct.pack("<I", round(seconds_promised * rate) * 2)
    path.write_bytes(bytes(data))


def test_a_directory_is_called_a_directory(tmp_path):
    with pytest.raises(UsageError, match=re.escape(f"--image {tmp_path}: {tmp_path} is a directory")):
        parse_image_switches([str(tmp_path)], file_mode=False)
    with pytest.raises(UsageError, match="is a directory"):
        parse_image_switches([f"{tmp_path}@2"], file_mode=True)


@pytest.mark.parametrize("time", ["abc", "", "nan", "2s"])
def test_a_time_that_is_not_seconds_is_called_so(photo, time):
    with pytest.raises(UsageError) as info:
        parse_image_switches([f"{photo}@{time}"], file_mode=True)
    assert f"{time!r} after @ is not a number of seconds" in str(info.value)
    assert "no such file" not in str(info.value)


def test_good_switches_and_names_with_an_at_still_work(tmp_path, photo):
    at_name = tmp_path / "me@home.png"
    at_name.write_bytes(b"")
    assert parse_image_switches([f"{photo}@1.5", str(at_name)], file_mode=True) == [(0.0, str(at_name)),
                                                                                    (1.5, str(photo))]
    with pytest.raises(UsageError, match="no such file"):  # neither the whole nor the part before @ exists
        parse_image_switches([str(tmp_path / "absent.jpg@abc")], file_mode=True)


def test_the_command_line_reports_both(tmp_path, photo):
    assert_clean_error(run_cli("--image", tmp_path), f"{tmp_path} is a directory")
    assert_clean_error(run_cli("--image", f"{photo}@abc"), "'abc' after @ is not a number of seconds")


def test_a_truncated_question_is_used_with_a_warning(tmp_path, capsys):
    question = tmp_path / "question.wav"
    truncated_wav(question, seconds_held=1.0, seconds_promised=4.0)
    assert len(read_question(str(question))) == 24000
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {question}: the WAV file looks truncated"), err
    assert "promises 4.00 s" in err and "holds 1.00 s" in err


def test_the_warning_comes_before_loading_in_file_mode(tmp_path):
    question = tmp_path / "question.wav"
    truncated_wav(question, seconds_held=0.5, seconds_promised=2.0)
    junk = tmp_path / "junk"
    junk.write_text("not weights")  # local files only: nothing is downloaded; loading fails after the warning
    result = run_cli("--input", question, "--output", tmp_path / "answer.wav",
                     "--model", junk, "--mimi", junk, "--tokenizer", junk)
    assert f"warning: {question}: the WAV file looks truncated" in result.stderr
    assert "holds 0.50 s" in result.stderr
    assert_clean_error(result)
