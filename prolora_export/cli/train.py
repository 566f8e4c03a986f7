"""``prolora-export train``: fine-tune a PRoLoRA adapter on a JSONL file."""

from __future__ import annotations

import click

from ..config import parse_target_modules
from ..train import DEFAULT_TARGETS, DTYPES
from . import trust_remote_code_option
from .options import TRAIN_DEFAULTS, hyperparameter_options
from .types import FINITE_FLOAT


@click.command("train")
@click.option("--base", required=True, help="Base model: HF folder, hub id or the alias smollm2-135m.")
@click.option(
    "--data",
    required=True,
    type=click.Path(dir_okay=False),
    help="Training JSONL (messages, prompt/completion or text lines).",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Adapter folder to write.")
@hyperparameter_options(TRAIN_DEFAULTS)
@click.option("--alpha", type=FINITE_FLOAT, default=16.0, show_default=True, help="lora_alpha; scaling = alpha / r.")
@click.option("--dropout", type=FINITE_FLOAT, default=0.05, show_default=True, help="Dropout on the adapter's input.")
@click.option(
    "--target-modules",
    default=DEFAULT_TARGETS,
    show_default=True,
    help="Comma list of layer names, a regex matching whole module paths, or all-linear (every "
    "Linear/Conv1D layer but the output head, fused projections such as Phi-3's qkv_proj included).",
)
@click.option(
    "--lr", type=FINITE_FLOAT, default=2e-4, show_default=True, help="Peak learning rate (10% warmup, linear decay)."
)
@click.option("--epochs", default=1, show_default=True, help="Passes over the data (ignored with --max-steps).")
@click.option("--max-steps", type=int, default=None, help="Optimizer steps to take (overrides --epochs).")
@click.option("--batch-size", default=4, show_default=True, help="Examples per step per process.")
@click.option("--grad-accum", default=1, show_default=True, help="Micro-batches accumulated per optimizer step.")
@click.option(
    "--max-length",
    type=int,
    default=None,
    help="Examples are cut to this many tokens  [default: 256, or the model's position limit when smaller]",
)
@click.option("--seed", default=0, show_default=True, help="Seed for init, data order and dropout.")
@click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    default="auto",
    show_default=True,
    help="auto = bf16 autocast on CUDA, fp32 on CPU. bf16/fp16 need CUDA.",
)
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations: less memory, ~30% slower.")
@click.option("--save-every", type=int, default=None, help="Also save (atomically) every N steps.")
@click.option("--resume", is_flag=True, help="Continue from the last save in --out (optimizer state, step).")
@click.option(
    "--eval-data",
    type=click.Path(dir_okay=False),
    default=None,
    help="Held-out JSONL; its loss is logged at every save.",
)
@click.option("--force", is_flag=True, help="Replace an existing --out instead of refusing.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@trust_remote_code_option
def command(target_modules: str, no_progress: bool, **options) -> None:
    """Fine-tune BASE with a PRoLoRA adapter on a JSONL file and write the adapter folder.

    Every line of --data (and --eval-data) is checked before training starts. The loss
    covers assistant turns / completions only. --out receives adapter_config.json,
    adapter_model.safetensors, train_log.jsonl and trainer_state/ (for --resume).

    Multi-GPU / multi-process: run the same command under `accelerate launch` or
    `torchrun --nproc_per_node N -m prolora_export train …`.
    """
    from ..train import read_summary, train

    out = train(
        options.pop("base"),
        options.pop("data"),
        options.pop("out"),
        target_modules=parse_target_modules(target_modules),
        progress=not no_progress,
        **options,
    )
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    s = read_summary(out)
    eval_part = f", eval loss {s['eval_loss']:.4f}" if s["eval_loss"] is not None else ""
    click.echo(
        f"trained {s['steps']} steps in {s['seconds']:.1f}s: loss {s['first_loss']:.4f} → {s['last_loss']:.4f} "
        f"(min {s['min_loss']:.4f}){eval_part}; {s['trainable_params']:,} trainable parameters\nadapter: {out}"
    )
