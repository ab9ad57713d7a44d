"""Streaming detokenisation with tokenizers trained inside the test."""

from __future__ import annotations

import pytest

from moshivis_mlx.model.text import TextStream, TokenizerError, load_tokenizer
from talk_support import train_tokenizer


def test_pieces_become_words_and_padding_prints_nothing(tokenizer_path):
    sp = load_tokenizer(tokenizer_path)
    assert sp.GetPieceSize() == 64
    text = TextStream(sp)
    ids = sp.EncodeAsIds("hello blue sky")
    out = [text.piece(i) for i in [3, 0] + ids[:1] + [3, 3] + ids[1:] + [0]]
    assert "".join(out) == "hello blue sky"  # no leading space before the first word
    assert out[:2] == ["", ""] and out[-1] == ""
    assert text.piece(1) == "" and text.piece(2) == ""  # control tokens <s> </s>
    assert text.piece(10_000) == ""  # beyond the vocabulary: nothing, never an exception


def test_byte_pieces_wait_for_a_whole_character(tmp_path):
    path = train_tokenizer(tmp_path / "bytes.model", vocab_size=300, byte_fallback=True, extra=("café",))
    sp = load_tokenizer(path)
    ids = sp.EncodeAsIds("a 日本")
    assert sum(sp.IsByte(i) for i in ids) == 6  # two 3-byte characters, spelled in bytes
    text = TextStream(sp, padding_ids=())
    out = [text.piece(i) for i in ids]
    assert "".join(out) == "a 日本"
    assert "" in out  # the first bytes of a character print nothing yet


def test_reset_forgets_half_characters_and_the_first_word(tmp_path, tokenizer_path):
    sp = load_tokenizer(tokenizer_path)
    text = TextStream(sp)
    first = sp.EncodeAsIds("hello")[0]
    assert text.piece(first) == "hello" and text.piece(first) == " hello"
    text.reset()
    assert text.piece(first) == "hello"


def test_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match="no such tokenizer file"):
        load_tokenizer(tmp_path / "absent.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        load_tokenizer(bad)
