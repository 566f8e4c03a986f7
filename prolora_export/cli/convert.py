"""``prolora-export convert``: move an adapter between PRoLoRA, PEFT LoRA and the reference layouts."""

import click

from ..convert import TARGETS, convert
from . import trust_remote_code_option


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
    help="Base model (folder, hub id or smollm2-135m): checks layer sizes; needed for a reference "
    "training-layout checkpoint with unshared_r = 0. Only its config is read.",
)
@trust_remote_code_option
def command(src: str, to: str, out: str, force: bool, base: str | None) -> None:
    """Convert the adapter folder SRC (format detected: prolora, peft-lora, reference-training,
    reference-expanded) to --to at --out, exactly: the converted adapter gives the same outputs.

    A plain PEFT LoRA adapter cannot become PRoLoRA (it has no shared chunks); a reference
    checkpoint can, after a bit-exact check that every chunk is a rotation of the first.
    """
    result = convert(src, to, out, force=force, base=base)
    click.echo(
        f"{result.source_format} → {result.target_format}: {result.modules} modules, "
        f"{result.parameters_in:,} → {result.parameters_out:,} parameters, written to {result.out}"
    )
