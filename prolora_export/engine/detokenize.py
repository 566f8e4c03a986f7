"""A generated sequence's text, decoded a few tokens at a time.

Decoding the whole generated token list again at every token costs time in proportion to its length
(the demo tokenizer: 24 µs at 64 tokens, 300 µs at 1,024, 1.3 ms at 4,096, measured), so a long
generation's text cost grew with the square of its length, and all of it ran inside the engine's
step, which every row waits for. :class:`TextDecoder` uses the window method of Hugging Face TGI and
vLLM: it decodes from a few tokens before the last text it released, and releases what the newest
tokens add. The window starts at a token that both of its decodes share, so whatever a decoder does
at the start of a text (a SentencePiece tokenizer drops the first token's space) cancels out; text
that ends in an incomplete character (U+FFFD from a partial byte sequence) waits for the next token.
"""

from __future__ import annotations

from collections.abc import Sequence

#: what a decoder writes for bytes that do not yet make a whole character
INCOMPLETE = "\ufffd"


class TextDecoder:
    """The text of ``tokens`` (a list the caller appends to) as ``tokenizer.decode(tokens,
    skip_special_tokens=True)`` gives it, in pieces: :meth:`update` after each new token, :meth:`rest`
    at the end."""

    def __init__(self, tokenizer, tokens: Sequence[int]):
        self.tokenizer = tokenizer
        self.tokens = tokens
        self.start = 0  # the window: tokens[start:] are decoded together ...
        self.released = 0  # ... and tokens[start:released] gave `known`, already released
        self.known = ""

    def _decode(self, end: int | None = None) -> str:
        return self.tokenizer.decode(self.tokens[self.start:end], skip_special_tokens=True)

    def update(self) -> str:
        """The text the tokens appended since the last call add ('' while it ends in an incomplete
        character)."""
        text = self._decode()
        if len(text) <= len(self.known) or text.endswith(INCOMPLETE):
            return ""
        new = text[len(self.known):]
        self.start, self.released = self.released, len(self.tokens)
        self.known = self._decode(self.released)
        return new

    def rest(self) -> str:
        """The text held back (an incomplete character at the end), as a decode of the whole list ends."""
        return self._decode()[len(self.known):]
