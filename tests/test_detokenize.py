"""TextDecoder: the pieces a stream sends add up to a decode of the whole token list (so no piece is
ever taken back), for a byte-level BPE tokenizer (the demo's: any token sequence) and a
SentencePiece-style one (byte fallback, the first space stripped; valid text: its decoder turns a
whole byte run with an invalid byte into replacement characters, including bytes sent before)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from prolora_export.engine.detokenize import INCOMPLETE, MAX_PENDING, TextDecoder

# multi-byte characters (split over byte tokens), spaces, punctuation, new lines
TEXT = "The café served 中文 text 😀 and ümlaut, then € 42 — done.\n  Two spaces; tab\tend. 🇫🇷 flags"


def stream(tokenizer, ids: list[int], invalid: bool = False) -> tuple[list[str], str]:
    """What a stream of ``ids`` sends: each update's piece, then the rest. Only ``invalid`` bytes (more
    than MAX_PENDING tokens without a whole character) may be sent as U+FFFD."""
    tokens: list[int] = []
    decoder = TextDecoder(tokenizer, tokens)
    pieces = []
    for token in ids:
        tokens.append(token)
        pieces.append(decoder.update())
        assert invalid or not pieces[-1].endswith(INCOMPLETE)
    return pieces, decoder.rest()


def check(tokenizer, ids: list[int], invalid: bool = False) -> None:
    """The pieces and the rest are the whole decode: no piece sent is ever taken back."""
    pieces, rest = stream(tokenizer, ids, invalid)
    assert "".join(pieces) + rest == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def demo_tokenizer(demo_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model)


def sentencepiece_tokenizer():
    """A Llama-2-style tokenizer: BPE over '▁'-marked words with byte fallback, and a decoder that turns '▁'
    into spaces, fuses byte tokens and strips the text's first space."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    symbols = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁",
               *"abcdefghijklmnopqrstuvwxyzTWC.,;-42", "▁t", "he", "▁the", "▁a", "nd", "▁and"]
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "a"), ("n", "d"), ("▁a", "nd")]
    core = Tokenizer(models.BPE({s: i for i, s in enumerate(symbols)}, merges, unk_token="<unk>", byte_fallback=True))
    core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_demo_tokenizer_text_comes_out_whole_and_in_order(demo_tokenizer) -> None:
    ids = demo_tokenizer(TEXT, add_special_tokens=False).input_ids
    pieces, rest = stream(demo_tokenizer, ids)
    assert "".join(pieces) == TEXT and rest == ""
    assert sum(p == "" for p in pieces) >= 3  # the emoji's and CJK's byte tokens waited for their last byte


def test_demo_tokenizer_any_token_sequence_matches_the_whole_decode(demo_tokenizer) -> None:
    """Random ids: invalid byte runs, special tokens (skipped) and all."""
    rng = np.random.default_rng(0)
    specials = demo_tokenizer.all_special_ids
    for _ in range(30):
        ids = rng.integers(0, len(demo_tokenizer), int(rng.integers(1, 60))).tolist()
        for at in rng.integers(0, len(ids), 3):
            ids[at] = int(rng.choice(specials))
        check(demo_tokenizer, ids)


def test_sentencepiece_style_spaces_and_byte_fallback_match_the_whole_decode() -> None:
    tokenizer = sentencepiece_tokenizer()
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == TEXT  # the toy tokenizer itself round-trips
    pieces, rest = stream(tokenizer, ids)
    assert "".join(pieces) == TEXT and rest == ""
    rng = np.random.default_rng(1)
    words = TEXT.split(" ")
    for _ in range(20):  # texts of random words, with the end-of-sequence token (skipped) among them
        ids = []
        for word in rng.choice(words, int(rng.integers(1, 12))):
            ids += tokenizer(str(word), add_special_tokens=False).input_ids
            if rng.random() < 0.2:
                ids.append(tokenizer.eos_token_id)
        check(tokenizer, ids)


def test_an_incomplete_character_at_the_end_is_the_rest(demo_tokenizer) -> None:
    ids = demo_tokenizer("ok 😀", add_special_tokens=False).input_ids
    pieces, rest = stream(demo_tokenizer, ids[:-1])  # the emoji's last byte never comes
    assert "".join(pieces) == "ok" and rest == demo_tokenizer.decode(ids[:-1])[2:] and rest.endswith(INCOMPLETE)


class Longest:
    """A tokenizer that records the longest list it was asked to decode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, 0

    def decode(self, ids, **options):
        self.longest = max(self.longest, len(ids))
        return self.tokenizer.decode(ids, **options)


@pytest.mark.parametrize("repeated", ["end of sequence", "invalid byte"])
def test_tokens_that_add_nothing_keep_the_window_short(demo_tokenizer, repeated) -> None:
    """A model that keeps generating its end-of-sequence token (skipped from the text; ignore_eos) or bytes
    that never make a character: the window stays short, and the text is still the whole decode's."""
    token = demo_tokenizer.eos_token_id if repeated == "end of sequence" else \
        demo_tokenizer.convert_tokens_to_ids("\u0122")  # a lone continuation byte (0x80..0xBF)
    ids = demo_tokenizer("Hello there", add_special_tokens=False).input_ids + [token] * 500
    counting = Longest(demo_tokenizer)
    pieces, rest = stream(counting, ids, invalid=repeated == "invalid byte")
    assert counting.longest <= 2 * MAX_PENDING
    assert "".join(pieces) + rest == demo_tokenizer.decode(ids, skip_special_tokens=True)


def test_each_update_decodes_a_window_not_the_whole_list() -> None:
    """The point of it: a long generation's decodes stay short."""
    class Counting:
        def __init__(self):
            self.longest = 0

        def decode(self, ids, **options):
            self.longest = max(self.longest, len(ids))
            return "".join(f"w{i} " for i in ids)

    tokenizer, tokens = Counting(), []
    decoder = TextDecoder(tokenizer, tokens)
    text = ""
    for token in range(2000):
        tokens.append(token)
        text += decoder.update()
    assert text == "".join(f"w{i} " for i in range(2000)) and tokenizer.longest <= 2


def test_spaces_before_punctuation_are_not_cleaned_up() -> None:
    """A tokenizer that would clean " ." up to "." (transformers 4's GPT-2 setting): the stream keeps the space,
    so that nothing it sent changes when the punctuation comes."""
    words = ["Hello", " ", ".", " world", " ?"]

    class CleaningUp:
        def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=True):
            text = "".join(words[i] for i in ids)
            return text.replace(" .", ".").replace(" ?", "?") if clean_up_tokenization_spaces else text

    pieces, rest = stream(CleaningUp(), list(range(len(words))))
    assert "".join(pieces) + rest == "Hello . world ?"
