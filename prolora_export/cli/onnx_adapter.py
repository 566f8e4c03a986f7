"""``prolora-export onnx-adapter``: a PRoLoRA adapter as an ONNX Runtime adapter file."""

import click

from ..onnx.adapters import NUMPY_DTYPES, export_onnx_adapter


@click.command("onnx-adapter")
@click.option("--adapter", required=True, type=click.Path(), help="PRoLoRA adapter folder.")
@click.option("--out", required=True, type=click.Path(), help="Output file, e.g. my.onnx_adapter.")
@click.option("--dtype", type=click.Choice(list(NUMPY_DTYPES)), default="fp32", show_default=True,
              help="Must match the compact graph's dtype.")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
def command(adapter: str, out: str, dtype: str, force: bool) -> None:
    """Write ADAPTER's shards as an ONNX Runtime adapter file (onnxruntime.AdapterFormat).

    Tensors keep their SPEC names (P.prolora_A_shard, ...), which are the overridable
    initializers of a graph made by `prolora-export onnx --mode compact`; activate the
    file per call with onnxruntime.LoraAdapter + RunOptions.add_active_adapter, so one
    InferenceSession serves many adapters.
    """
    click.echo(export_onnx_adapter(adapter, out, dtype=dtype, force=force).summary())
