"""PRoLoRA vs PEFT LoRA on the demo model: held-out loss at equal and at larger LoRA budgets.

Every run uses the same data, batches, steps, learning-rate schedule, dropout and seed
(the batch order and LR schedule of ``prolora_export.train``); only the adapter differs.
LoRA ranks are chosen from the PRoLoRA adapter's trainable-parameter count: the smallest
rank with at least the same budget, and the smallest with at least twice the budget.
α = 2·rank everywhere, so every adapter has the same scaling γ = 2.

    python examples/compare_lora.py            # ~10 min on 2 idle CPU cores; writes examples/RESULTS.md
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import AutoTokenizer

from prolora_export.config import PRoLoRAConfig
from prolora_export.data import collate, load_dataset
from prolora_export.inject import inject_adapter
from prolora_export.models import load_base_model, resolve_model
from prolora_export.train import MAX_GRAD_NORM, evaluate_loss, lr_at, micro_batch

HERE = Path(__file__).parent


def prolora_model(base: str, targets: list[str], r: int, u: int, m: int, n: int, dropout: float, seed: int):
    torch.manual_seed(seed)
    config = PRoLoRAConfig(r=r, unshared_r=u, sharing_rate_a=m, sharing_rate_b=n, lora_alpha=2 * r,
                           lora_dropout=dropout, target_modules=targets)  # fmt: skip
    return inject_adapter(load_base_model(base), config)


def lora_model(base: str, targets: list[str], r: int, dropout: float, seed: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=targets)
    return get_peft_model(load_base_model(base), config)


def fit(model, examples, steps: int, batch: int, lr: float, seed: int, pad_id: int) -> float:
    """The training step of ``prolora_export.train`` on one process; returns seconds taken."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        torch.manual_seed(seed * 1_000_003 + step * 1009)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        model(**collate(micro_batch(examples, step, batch, 1, 0, seed), pad_id)).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args()
    targets = args.targets.split(",")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.base))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_set = load_dataset(HERE / "data" / "train.jsonl", tokenizer, args.max_length)
    eval_set = load_dataset(HERE / "data" / "eval.jsonl", tokenizer, args.max_length)

    r, u, m, n, dropout = 8, 1, 2, 2, 0.05
    base_loss = evaluate_loss(load_base_model(args.base), eval_set, 8, pad_id, "cpu")
    runs = [(f"PRoLoRA r={r}, u={u}, m=n={m}", lambda: prolora_model(args.base, targets, r, u, m, n, dropout, 0))]
    budget = sum(p.numel() for p in runs[0][1]().parameters() if p.requires_grad)
    per_rank = sum(p.numel() for p in lora_model(args.base, targets, 1, dropout, 0).parameters() if p.requires_grad)
    equal = budget / per_rank  # LoRA never gets fewer parameters than PRoLoRA: ranks are rounded up
    for rank in (math.ceil(equal), math.ceil(2 * equal)):
        runs.append((f"LoRA r={rank}", lambda rank=rank: lora_model(args.base, targets, rank, dropout, 0)))

    rows = []
    for name, build in runs:
        model = build()
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        seconds = fit(model, train_set, args.steps, args.batch_size, args.lr, args.seed, pad_id)
        loss = evaluate_loss(model, eval_set, 8, pad_id, "cpu")
        rows.append(f"| {name} | {params:,} | {params / budget:.2f}× | {loss:.4f} | {seconds:.0f} |")
        print(rows[-1], flush=True)
    command = "python examples/compare_lora.py " + " ".join(sys.argv[1:])
    table = "\n".join(
        [
            f"Held-out loss on examples/data/eval.jsonl ({len(eval_set)} examples) after {args.steps} steps "
            f"of batch {args.batch_size} (max length {args.max_length}, lr {args.lr}, targets {args.targets}, "
            f"seed {args.seed}); base model without adapter: {base_loss:.4f}.",
            "",
            "| adapter | trainable params | vs PRoLoRA | eval loss | train s |",
            "|---|---:|---:|---:|---:|",
            *rows,
        ]
    )
    print(table)
    Path(args.out).write_text(f"# PRoLoRA vs LoRA on SmolLM2-135M\n\nCommand: `{command.strip()}`\n\n{table}\n")


if __name__ == "__main__":
    main()
