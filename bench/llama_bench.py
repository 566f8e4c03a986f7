"""llama.cpp's ``llama-bench`` as a peer timed inside our benchmarks' rounds.

A ratio against llama.cpp is only as good as the pairing of its two figures: this host's speed drifts by
10-30 % over minutes, so a llama-bench run after all of our rounds (as the pages once did) paired our median
with a different minute. :class:`LlamaBench` runs one ``-r 1`` measurement per call; bench_graphs and
bench_llamacpp call it once in each of their rounds, and their ratios pair it round by round
(:func:`quiet.paired_ratio`).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

#: the most one llama-bench call may take (a 512-token prompt on an f32 1B model takes seconds)
TIMEOUT_S = 900


def parse(entries: list[dict], files: dict[str, Path]) -> dict[str, dict[str, float]]:
    """llama-bench's JSON → {key of ``files``: {metric: ms}}: generation as decode_b1 (ms per token), prompt
    processing of n tokens as prefill_n (ms for the prompt)."""
    names = {path.name: key for key, path in files.items()}
    out: dict[str, dict[str, float]] = {key: {} for key in files}
    for e in entries:
        row = out[names[Path(e["model_filename"]).name]]
        if e["n_gen"]:
            row["decode_b1"] = 1e3 / e["avg_ts"]
        elif e["n_prompt"]:
            row[f"prefill_{e['n_prompt']}"] = 1e3 * e["n_prompt"] / e["avg_ts"]
    return out


class LlamaBench:
    """``llama-bench`` on one GGUF with ``threads`` threads. Each call is one run (``-r 1``, after llama-bench's
    own warm-up) of what ``metrics`` asks for: decode_b1, generation of ``steps`` tokens after ``depth`` cached
    ones; prefill_n, processing an n-token prompt on an empty context."""

    def __init__(self, binary: Path, gguf: Path, threads: int, depth: int = 0):
        self.binary, self.gguf, self.threads, self.depth = binary, gguf, threads, depth

    def __call__(self, metrics: tuple[str, ...], steps: int) -> dict[str, float]:
        prompts = [m.removeprefix("prefill_") for m in metrics if m.startswith("prefill_")]
        runs = []
        if "decode_b1" in metrics:
            runs.append(("decode", ["-p", "0", "-n", str(steps), *(("-d", str(self.depth)) if self.depth else ())]))
        if prompts:
            runs.append(("prefill", ["-p", ",".join(prompts), "-n", "0"]))
        entries = []
        for label, args in runs:
            command = [str(self.binary), "-m", str(self.gguf), "-t", str(self.threads), "-r", "1", "-o", "json", *args]
            done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
            if done.returncode != 0:
                raise SystemExit(f"llama-bench {label} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
            entries += json.loads(done.stdout)
        return parse(entries, {"gguf": self.gguf})["gguf"]
