"""The text stream as readable text: sentencepiece pieces, one per 80 ms frame.

A piece starting with "▁" starts a word. The padding ids the model emits
while it listens or speaks without a new word print nothing. Byte pieces
("<0xE2>") are held until they complete a UTF-8 character.
"""

from __future__ import annotations

from pathlib import Path

from .config import TEXT_PADDING_IDS

WORD_BOUNDARY = "\u2581"  # "▁", sentencepiece's space


class TokenizerError(ValueError):
    """The text tokenizer could not be loaded."""


def load_tokenizer(path: str | Path):
    """A `sentencepiece.SentencePieceProcessor` from a `.model` file."""
    import sentencepiece

    path = Path(path).expanduser()
    if not path.is_file():
        raise TokenizerError(f"{path}: no such tokenizer file (a sentencepiece .model)")
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise TokenizerError(f"{path}: not a sentencepiece model ({e})") from None
    return processor


class TextStream:
    """Turns the model's text tokens, one at a time, into text."""

    def __init__(self, tokenizer, padding_ids: tuple[int, ...] = TEXT_PADDING_IDS):
        self.tokenizer = tokenizer
        self.padding_ids = frozenset(padding_ids)
        self.vocab_size = tokenizer.GetPieceSize()
        self._pending_bytes = bytearray()
        self._started = False

    def reset(self) -> None:
        self._pending_bytes.clear()
        self._started = False

    def piece(self, token: int) -> str:
        """The text this token adds ("" for padding and control tokens)."""
        token = int(token)
        if token in self.padding_ids or not 0 <= token < self.vocab_size:
            return ""
        sp = self.tokenizer
        if sp.IsControl(token) or sp.IsUnknown(token):
            return ""
        if sp.IsByte(token):
            self._pending_bytes.append(int(sp.IdToPiece(token)[3:5], 16))  # "<0xAB>"
            try:
                text = self._pending_bytes.decode("utf-8")
            except UnicodeDecodeError:
                if len(self._pending_bytes) < 4:
                    return ""  # wait for the rest of the character
                text = self._pending_bytes.decode("utf-8", errors="replace")
            self._pending_bytes.clear()
            return self._emit(text)
        self._pending_bytes.clear()
        return self._emit(sp.IdToPiece(token).replace(WORD_BOUNDARY, " "))

    def _emit(self, text: str) -> str:
        if not self._started:  # no leading space before the first word
            text = text.lstrip(" ")
            self._started = bool(text)
        return text
