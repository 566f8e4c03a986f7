"""``prolora-export inspect``: hyperparameters, per-layer shapes and parameter counts."""

import json

import click

from ..errors import PRoLoRAError
from . import trust_remote_code_option


@click.command("inspect")
@click.argument("adapter", required=False, type=click.Path(path_type=str))
@click.option(
    "--base",
    default=None,
    metavar="MODEL",
    help="Base model. With ADAPTER: check it against the model. Without: plan an adapter (no training).",
)
@click.option("--r", "r", type=int, default=8, show_default=True, help="Rank (planning only).")
@click.option("--unshared-r", type=int, default=1, show_default=True, help="Unshared rank u (planning only).")
@click.option("--sharing-rate-a", type=int, default=2, show_default=True, help="Chunks of A, m (planning only).")
@click.option("--sharing-rate-b", type=int, default=2, show_default=True, help="Chunks of B, n (planning only).")
@click.option("--no-rotate", is_flag=True, help="Turn rotation off (planning only; counts do not change).")
@click.option(
    "--target-modules",
    default="q_proj,k_proj,v_proj,o_proj",
    show_default=True,
    help="Comma list of layer names, or a regex matching whole module paths (planning only).",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default="float32",
    show_default=True,
    help="Element type for the byte count (planning only).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@trust_remote_code_option
def command(
    adapter, base, r, unshared_r, sharing_rate_a, sharing_rate_b, no_rotate, target_modules, dtype, as_json
) -> None:
    """Report on ADAPTER (any supported format), or, with --base and no ADAPTER, on the PRoLoRA
    adapter the given hyperparameters would create on that model: parameters, bytes, and the
    ratio to LoRA of the same rank.

    \b
    Examples:
      prolora-export inspect out/adapter
      prolora-export inspect --base smollm2-135m --r 8 --unshared-r 1 \\
        --target-modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
    """
    from ..config import PRoLoRAConfig, parse_target_modules
    from ..inspect import inspect_adapter, inspect_model

    if adapter is not None:
        report = inspect_adapter(adapter, base)
    elif base is not None:
        config = PRoLoRAConfig(
            r=r,
            unshared_r=unshared_r,
            sharing_rate_a=sharing_rate_a,
            sharing_rate_b=sharing_rate_b,
            rotate=not no_rotate,
            target_modules=parse_target_modules(target_modules),
        )
        report = inspect_model(base, config, dtype)
    else:
        raise PRoLoRAError("give an ADAPTER folder, or --base MODEL with hyperparameters to plan one")
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.format_text())
