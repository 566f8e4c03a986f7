"""``prolora-export merge``: fold one or more PRoLoRA adapters into a base model's weights."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import PRoLoRAError
from . import trust_remote_code_option
from .options import adapter_read_options
from .types import FINITE_FLOAT


@click.command("merge")
@click.option("--base", "base", required=True, help="Base MODEL: HF folder (safetensors), hub id, or smollm2-135m.")
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path),
    help="Adapter folder (PRoLoRA, PEFT LoRA or a reference PRoLoRA checkpoint); repeat to merge several.",
)
@click.option(
    "--weight",
    "-w",
    "weights",
    multiple=True,
    type=FINITE_FLOAT,
    help="Weight w_k of each adapter, in --adapter order; none = all 1.0, else exactly one per adapter.",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output model folder (written atomically).")
@click.option(
    "--dtype",
    type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
    default="auto",
    show_default=True,
    help="Output dtype; auto keeps each tensor's dtype, the others convert ALL floating tensors.",
)
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@adapter_read_options
@trust_remote_code_option
def command(
    base: str,
    adapters: tuple[Path, ...],
    weights: tuple[float, ...],
    out: Path,
    dtype: str,
    force: bool,
    quiet: bool,
    read_options,
) -> None:
    """Write a drop-in copy of MODEL with the adapters merged into its weights.

    \b
    Every adapted layer becomes
        W' = W + Σ_k w_k · γ_k · B_k · A_k      (γ_k = lora_alpha_k / r_k)
    i.e. a weighted LINEAR COMBINATION OF THE DELTAS, each adapter with its own
    scaling and rank, computed in fp32 and cast once. It is not a merge of the
    A/B factors (averaging factors would not give the averaged delta).

    The model is never loaded whole: shards are processed one at a time (peak
    memory ~ largest shard + adapters). Shard names, the index, config,
    tokenizer and chat template are kept; tied weights stay tied. All checks
    (module paths, shapes, tied lm_head, disk space, existing --out) run before
    anything is written and report every problem at once.

    \b
    Example:
      prolora-export merge --base smollm2-135m --adapter A --adapter B \\
          --weight 0.7 --weight 0.3 --out merged --dtype bf16
    """
    if weights and len(weights) != len(adapters):
        raise PRoLoRAError(f"got {len(weights)} --weight for {len(adapters)} --adapter: give none or one per adapter")
    from ..merge import merge_adapters

    pairs = list(zip(adapters, weights or [1.0] * len(adapters), strict=True))
    report = merge_adapters(
        base, pairs, out, dtype=dtype, force=force, progress=not quiet, read_options=read_options
    )
    click.echo(
        f"merged {report.tensors_merged} tensors from {len(pairs)} adapter(s) into {report.out} "
        f"({report.shards} shard(s), {report.tensors_written} tensors, {report.bytes_written / 2**20:.1f} MiB, "
        f"dtype {report.dtype}) in {report.seconds:.1f} s; "
        f"max rounding error of the cast: {report.max_rounding_error:.3g}"
    )
