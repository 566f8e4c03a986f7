"""``prolora-export inspect``: hyperparameters, per-layer shapes and parameter counts."""

import json

import click

from ..errors import PRoLoRAError
from . import trust_remote_code_option
from .options import TRAIN_DEFAULTS, adapter_read_options


@click.command("inspect")
@click.argument("adapter", required=False, type=click.Path(path_type=str))
@click.option(
    "--base",
    default=None,
    metavar="MODEL",
    help="Base model. With ADAPTER: check it against the model. Without: plan an adapter (no training).",
)
@click.option(
    "--target-modules",
    default="all-linear",
    show_default=True,
    help="Comma list of layer names, a regex matching whole module paths, or all-linear (every Linear/Conv1D "
    "layer but the output head: train's default) (planning only).",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default="float32",
    show_default=True,
    help="Element type for the byte count (planning only).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@adapter_read_options
@trust_remote_code_option
def command(adapter, base, target_modules, dtype, as_json, read_options) -> None:
    """Report on ADAPTER (any supported format), or, with --base and no ADAPTER, on the PRoLoRA
    adapter the given hyperparameters would create on that model: parameters, bytes, and the
    ratio to LoRA of the same rank. For a reference checkpoint (which does not record m, n, u, rotation
    or strides) it shows the values inferred and where each came from: files, inference or options.
    The hyperparameter options state values for ADAPTER, or plan (defaults r=8, u=1, m=n=2) without it.

    \b
    Examples:
      prolora-export inspect out/adapter
      prolora-export inspect --base smollm2-135m --r 8 --unshared-r 1 \\
        --target-modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
    """
    from ..config import PRoLoRAConfig, parse_target_modules
    from ..inspect import inspect_adapter, inspect_model

    if adapter is not None:
        report = inspect_adapter(adapter, base, read_options)
    elif base is not None:
        planned = {**TRAIN_DEFAULTS, **read_options.stated()}
        config = PRoLoRAConfig(**planned, target_modules=parse_target_modules(target_modules))
        report = inspect_model(base, config, dtype)
    else:
        raise PRoLoRAError("give an ADAPTER folder, or --base MODEL with hyperparameters to plan one")
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.format_text())
