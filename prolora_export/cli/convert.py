"""``prolora-export convert``: move an adapter between PRoLoRA, PEFT LoRA and the reference layouts."""

import click

from ..convert import TARGETS, convert
from . import trust_remote_code_option
from .options import adapter_read_options


@click.command("convert")
@click.argument("src", type=click.Path(file_okay=False, path_type=str))
@click.option(
    "--to",
    "to",
    type=click.Choice(TARGETS),
    required=True,
    help="prolora: our compact folder (SPEC §2); peft: PEFT LoRA with full A and B (loads in PEFT, vLLM …).",
)
@click.option("--out", required=True, type=click.Path(path_type=str), help="Output folder (written atomically).")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option(
    "--base",
    default=None,
    metavar="MODEL",
    help="Base model (folder, hub id or smollm2-135m): checks layer sizes, and gives them where a reference "
    "checkpoint does not (its expanded adapter_model.bin alone). Only its config is read.",
)
@adapter_read_options
@trust_remote_code_option
def command(src: str, to: str, out: str, force: bool, base: str | None, read_options) -> None:
    """Convert the adapter folder SRC (format detected: prolora, peft-lora, reference-training,
    reference-expanded) to --to at --out, exactly: the converted adapter gives the same outputs.

    A reference PRoLoRA checkpoint (the paper's code: its checkpoint-N/ training layout, or
    the final folder's expanded adapter_model.bin) is read as saved: what its files do not say
    (m, n, u, rotation, strides) is inferred and printed with where each value came from; the
    expanded layout only after a bit-exact check that every chunk is a rotation of the first.
    A plain PEFT LoRA adapter that no chunk structure reproduces cannot become PRoLoRA.
    """
    result = convert(src, to, out, force=force, base=base, options=read_options)
    if result.source_format != "prolora":
        click.echo(f"read as: {result.inference.summary()}")
    click.echo(
        f"{result.source_format} → {result.target_format}: {result.modules} modules, "
        f"{result.parameters_in:,} → {result.parameters_out:,} parameters, written to {result.out}"
    )
