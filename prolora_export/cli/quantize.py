"""``prolora-export quantize``: an int4 or int8 base for an existing ONNX export, adapters kept float."""

import click

from ..onnx.quant_settings import BITS
from ..onnx.quantize import quantize_onnx
from .options import quantization_options
from .types import refuse_inapplicable


@click.command("quantize")
@click.argument("onnx_dir", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Output folder (config and tokenizer copied).")
@click.option("--bits", type=click.Choice([str(b) for b in BITS]), default="4", show_default=True,
              help="4: MatMulNBits (blockwise int4 weights) and an int4 GatherBlockQuantized embedding. "
                   "8: MatMulNBits with 8-bit blocks; the embedding stays fp32.")
@quantization_options
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
def command(onnx_dir, out, bits, block_size, accuracy_level, int8_modules, force) -> None:
    """Quantize the base weights of ONNX_DIR (a merged or compact export) with ONNX Runtime's own quantizers.

    \b
    Quantized: every MatMul with a constant base weight (attention, MLP, lm_head; a
    tied lm_head gets its own copy), and with --bits 4 the token embedding.
    Float and overridable: every adapter tensor (graph inputs of a compact export,
    excluded by name and checked byte for byte afterwards), norms, attention.
    onnx-adapter files made for the fp32 compact export apply to the result unchanged.
    """
    refuse_inapplicable({"int8_modules": (bits == "4", "--bits 4")})
    report = quantize_onnx(onnx_dir, out, bits=int(bits), block_size=block_size, accuracy_level=accuracy_level,
                           int8_modules=int8_modules, force=force)
    click.echo(report.summary())
