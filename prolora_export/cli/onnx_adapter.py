"""``prolora-export onnx-adapter``: a PRoLoRA adapter as an ONNX Runtime adapter file."""

import click

from ..onnx.adapters import NUMPY_DTYPES, export_onnx_adapter
from . import trust_remote_code_option
from .options import adapter_read_options


@click.command("onnx-adapter")
@click.option("--adapter", required=True, type=click.Path(),
              help="Adapter folder: PRoLoRA, or a reference PRoLoRA checkpoint.")
@click.option("--out", required=True, type=click.Path(), help="Output file, e.g. my.onnx_adapter.")
@click.option("--dtype", type=click.Choice(list(NUMPY_DTYPES)), default=None,
              help="Must match the compact graph's dtype (default: --graph's, else fp32).")
@click.option("--graph", default=None, type=click.Path(exists=True),
              help="The compact ONNX export (folder or .onnx) the file is for: a geometry that differs is refused, "
                   "a lora_alpha that differs is folded into the B shards so the file is exact there.")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@click.option("--base", default=None, metavar="MODEL",
              help="Base model: checks the layer sizes, and gives them where a reference checkpoint does not "
                   "(its expanded adapter_model.bin alone). Only its config is read.")
@adapter_read_options
@trust_remote_code_option
def command(
    adapter: str, out: str, dtype: str | None, graph: str | None, force: bool, base: str | None, read_options
) -> None:
    """Write ADAPTER's shards as an ONNX Runtime adapter file (onnxruntime.AdapterFormat).

    Tensors keep their SPEC names (P.prolora_A_shard, ...), which are the overridable
    initializers of a graph made by `prolora-export onnx --mode compact`; activate the
    file per call with onnxruntime.LoraAdapter + RunOptions.add_active_adapter, so one
    InferenceSession serves many adapters.

    The file records the geometry and scaling it fits (model_version: a fingerprint of r, u,
    m, n, the strides and the layers; adapter_version: the bits of γ = alpha / r as float32);
    onnx.adapters.check_adapter_fits refuses a file that does not fit a graph.
    """
    click.echo(
        export_onnx_adapter(
            adapter, out, dtype=dtype, force=force, base=base, read_options=read_options, graph=graph
        ).summary()
    )
