"""``prolora-export quantize``: an int4 or int8 base for an existing ONNX export, adapters kept float."""

import click

from ..onnx.quantize import ACCURACY_LEVELS, BITS, DEFAULT_ACCURACY_LEVEL, DEFAULT_BLOCK_SIZE, quantize_onnx
from .types import refuse_inapplicable


@click.command("quantize")
@click.argument("onnx_dir", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Output folder (config and tokenizer copied).")
@click.option("--bits", type=click.Choice([str(b) for b in BITS]), default="4", show_default=True,
              help="4: MatMulNBits (blockwise int4 weights) and an int4 GatherBlockQuantized embedding. "
                   "8: quantize_dynamic (int8 weights per column, activations quantized per call); "
                   "the embedding stays fp32.")
@click.option("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, show_default=True,
              help="int4: weights per scale along K (a power of two ≥ 16); smaller is more accurate and larger.")
@click.option("--accuracy-level", type=click.IntRange(min(ACCURACY_LEVELS), max(ACCURACY_LEVELS)),
              default=DEFAULT_ACCURACY_LEVEL, show_default=True,
              help="int4: compute type of MatMulNBits' activations: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 "
                   "(fastest on CPU).")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
def command(onnx_dir, out, bits, block_size, accuracy_level, force) -> None:
    """Quantize the base weights of ONNX_DIR (a merged or compact export) with ONNX Runtime's own quantizers.

    \b
    Quantized: every MatMul with a constant base weight (attention, MLP, lm_head; a
    tied lm_head gets its own copy), and with --bits 4 the token embedding.
    Float and overridable: every adapter tensor (graph inputs of a compact export,
    excluded by name and checked byte for byte afterwards), norms, attention.
    onnx-adapter files made for the fp32 compact export apply to the result unchanged.
    """
    refuse_inapplicable({"block_size": (bits == "4", "--bits 4"), "accuracy_level": (bits == "4", "--bits 4")})
    report = quantize_onnx(onnx_dir, out, bits=int(bits), block_size=block_size, accuracy_level=accuracy_level,
                           force=force)
    click.echo(report.summary())
