"""Write the small demo instruction set: examples/data/train.jsonl and examples/data/eval.jsonl.

Deterministic (fixed seed, no downloads): template tasks with a fixed answer style that a
135M model picks up within a few dozen steps. Run from the repository root:

    python examples/make_dataset.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Canada": "Ottawa",
    "Brazil": "Brasília",
    "Argentina": "Buenos Aires",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Turkey": "Ankara",
    "Australia": "Canberra",
    "Mexico": "Mexico City",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Ireland": "Dublin",
    "Austria": "Vienna",
    "Hungary": "Budapest",
    "Netherlands": "Amsterdam",
    "Belgium": "Brussels",
    "Denmark": "Copenhagen",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Morocco": "Rabat",
    "Nigeria": "Abuja",
    "Cuba": "Havana",
}
UNITS = [
    ("km", "m", 1000),
    ("m", "cm", 100),
    ("kg", "g", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("liters", "milliliters", 1000),
    ("days", "hours", 24),
    ("weeks", "days", 7),
]
WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "garden",
    "pencil",
    "window",
    "orange",
    "silver",
    "planet",
    "candle",
    "forest",
    "bridge",
    "rabbit",
    "butter",
    "guitar",
    "marble",
    "rocket",
    "tunnel",
    "violet",
]
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun"]
ITEMS = ["apples", "books", "coins", "pens", "shells", "stamps"]


def arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    if rng.random() < 0.5:
        return (
            f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
            f"{a} + {b} = {a + b}. {name} has {a + b} {item}.",
        )
    a, b = max(a, b), min(a, b)
    return (
        f"{name} has {a} {item} and gives away {b}. How many {item} are left?",
        f"{a} - {b} = {a - b}. {a - b} {item} are left.",
    )


def conversion(rng: random.Random) -> tuple[str, str]:
    big, small, factor = rng.choice(UNITS)
    n = rng.randint(2, 12)
    return f"Convert {n} {big} to {small}.", f"{n} {big} = {n} × {factor} = {n * factor} {small}."


def capital(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(sorted(CAPITALS))
    return f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}."


def reverse(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, 3)
    return f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words))


TASKS = (arithmetic, conversion, capital, reverse)


def make(count: int, seed: int) -> list[dict]:
    """``count`` lines; even lines in chat form, odd lines in prompt/completion form (both are supported)."""
    rng = random.Random(seed)
    lines = []
    for i in range(count):
        question, answer = TASKS[i % len(TASKS)](rng)
        if i % 2 == 0:
            lines.append(
                {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
            )
        else:
            lines.append({"prompt": f"Question: {question}\nAnswer: ", "completion": answer})
    return lines


def main() -> None:
    folder = Path(__file__).parent / "data"
    folder.mkdir(exist_ok=True)
    for name, count, seed in (("train.jsonl", 400, 0), ("eval.jsonl", 80, 1)):
        with open(folder / name, "w", encoding="utf-8") as handle:
            for line in make(count, seed):
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")
        print(f"wrote {folder / name} ({count} lines)")


if __name__ == "__main__":
    main()
