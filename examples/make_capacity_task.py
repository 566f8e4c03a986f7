"""Write the capacity task of the PRoLoRA-vs-LoRA study: a word cipher the base model cannot know.

A fixed random bijection maps ``--words`` source words to as many code words (both sets
are single-token lowercase English words of the demo model's tokenizer, disjoint). Every
line spells out ``--per-example`` entries of it, in a random order::

    {"text": " river = tiger apple = blue stone = cargo house = lamp"}

The study (``compare_lora.py``) takes the loss on the code words only (the token after
each ``=``): learning the task means storing the whole table in the adapter, so an
adapter's capacity shows in how much of it is learned. The validation and test splits are
NEW lines (no word tuple of theirs occurs in train, and every word they use occurs in train
many times): they test the learned table, not remembered lines.

Deterministic: the word lists come from the (cached) demo tokenizer's vocabulary in sorted
order and every choice from ``random.Random(seed)``; nothing is downloaded. Run from the
repository root:

    python examples/make_capacity_task.py            # writes examples/capacity/{train,valid,test}.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).parent
SEPARATOR = " = "


def single_token_words(tokenizer) -> list[str]:
    """Lowercase alphabetic words of 4–7 letters that are one token with a leading space, sorted."""
    words = sorted(
        piece[1:]
        for piece in tokenizer.get_vocab()
        if piece.startswith("Ġ") and piece[1:].isascii() and piece[1:].isalpha() and piece[1:].islower()
        and 4 <= len(piece) - 1 <= 7
    )  # fmt: skip
    return [w for w in words if tokenizer(" " + w, add_special_tokens=False)["input_ids"].__len__() == 1]


def cipher(words: list[str], size: int, rng: random.Random) -> dict[str, str]:
    """``size`` source words, each mapped to its own code word; the two sets are disjoint."""
    chosen = rng.sample(words, 2 * size)
    return dict(zip(chosen[:size], chosen[size:], strict=True))


def make_splits(table: dict[str, str], per_example: int, counts: dict[str, int], rng: random.Random):
    """Disjoint splits of distinct word tuples; held-out splits only use words seen in train."""
    sources = list(table)
    seen: set[tuple[str, ...]] = set()
    splits: dict[str, list[dict[str, str]]] = {}
    for name, count in counts.items():
        rows = []
        while len(rows) < count:
            combo = tuple(rng.sample(sources, per_example))
            if combo in seen:
                continue
            seen.add(combo)
            rows.append({"text": "".join(f" {w}{SEPARATOR}{table[w]}" for w in combo)})
        splits[name] = rows
    train_words = {w for row in splits["train"] for w in row["text"].split()[::3]}
    missing = set(sources) - train_words
    if missing:
        raise SystemExit(f"{len(missing)} words never occur in train: raise --train or lower --words")
    return splits


def main() -> None:
    from transformers import AutoTokenizer

    from prolora_export.models import resolve_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2-135m", help="whose tokenizer picks the words")
    parser.add_argument("--words", type=int, default=100, help="entries of the cipher table")
    parser.add_argument("--per-example", type=int, default=4)
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--valid", type=int, default=200)
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE / "capacity"))
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.base))
    rng = random.Random(args.seed)
    table = cipher(single_token_words(tokenizer), args.words, rng)
    splits = make_splits(table, args.per_example, {"train": args.train, "valid": args.valid, "test": args.test}, rng)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (out / "cipher.json").write_text(json.dumps(table, indent=0, sort_keys=True) + "\n")
    print(f"{len(table)} cipher entries; " + ", ".join(f"{n}: {len(r)}" for n, r in splits.items()) + f" → {out}")


if __name__ == "__main__":
    main()
