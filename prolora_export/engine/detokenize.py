"""A generated sequence's text, decoded a few tokens at a time.

Decoding the whole generated token list again at every token costs time in proportion to its length
(the demo tokenizer: 24 µs at 64 tokens, 300 µs at 1,024, 1.3 ms at 4,096, measured), so a long
generation's text cost grew with the square of its length, and all of it ran inside the engine's
step, which every row waits for. :class:`TextDecoder` uses the window method of Hugging Face TGI and
vLLM: it decodes from a few tokens before the last text it released, and releases what the newest
tokens add. The window starts at a token that both of its decodes share, so whatever a decoder does
at the start of a text (a SentencePiece tokenizer drops the first token's space) cancels out; text
that ends in an incomplete character (U+FFFD from a partial byte sequence) waits for the next token.
The window stays short whatever the model generates: tokens that add no text (an end-of-sequence
token generated again and again under ``ignore_eos``, skipped) leave it, and after
:data:`MAX_PENDING` tokens without a whole character the bytes are invalid and go out as U+FFFD.
"""

from __future__ import annotations

from collections.abc import Sequence

#: what a decoder writes for bytes that do not yet make a whole character
INCOMPLETE = "\ufffd"
#: tokens an incomplete character may take before the text is released as it is (a UTF-8 character has
#: at most 4 bytes; more tokens that still end in U+FFFD are invalid bytes, which stay U+FFFD)
MAX_PENDING = 8


class TextDecoder:
    """The text of ``tokens`` (a list the caller appends to) as ``tokenizer.decode(tokens,
    skip_special_tokens=True, clean_up_tokenization_spaces=False)`` gives it, in pieces: :meth:`update`
    after each new token, :meth:`rest` at the end."""

    def __init__(self, tokenizer, tokens: Sequence[int]):
        self.tokenizer = tokenizer
        self.tokens = tokens
        self.taken = 0  # tokens of the list seen so far
        self.context: list[int] = []  # the tokens whose text was released last: the window starts with them
        self.known = ""  # their text
        self.pending: list[int] = []  # the tokens after them, whose text is not released yet

    def _decode(self, ids: list[int]) -> str:
        # no clean-up of spaces before punctuation: it would change text already released (" ." sent, then
        # "." once the next token came); transformers 5 skips it for BPE tokenizers anyway, as vLLM's does
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _window(self) -> str:
        """The text of the window, with the tokens appended since the last call taken into it."""
        self.pending += self.tokens[self.taken:]
        self.taken = len(self.tokens)
        return self._decode(self.context + self.pending)

    def update(self) -> str:
        """The text the tokens appended since the last call add ('' while it ends in an incomplete
        character). Tokens that add no text (special tokens, skipped) leave the window, so that it stays a
        few tokens long whatever the model generates."""
        text = self._window()
        if text.endswith(INCOMPLETE) and len(self.pending) < MAX_PENDING:
            return ""
        if len(text) <= len(self.known):
            self.pending = []
            return ""
        new = text[len(self.known):]
        self.context, self.pending = self.pending, []
        self.known = self._decode(self.context)
        return new

    def rest(self) -> str:
        """The text held back (an incomplete character at the end), as a decode of the whole list ends."""
        return self._window()[len(self.known):]
