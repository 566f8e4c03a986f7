"""``prolora-export onnx``: export base + adapter to an ONNX folder (merged or compact)."""

import click

from ..onnx.export import DEFAULT_ADAPTERS, DTYPES, MODES
from ..onnx.op import BODIES
from ..onnx.quantize import QUANTIZE, export_quantized
from . import trust_remote_code_option
from .options import adapter_read_options, quantization_options
from .types import refuse_inapplicable


@click.command("onnx")
@click.option("--base", required=True, help="Base model: folder, hub id or 'smollm2-135m'.")
@click.option("--adapter", required=True, multiple=True, type=click.Path(),
              help="Adapter folder: PRoLoRA, PEFT LoRA or a reference PRoLoRA checkpoint (with --slots: one or "
                   "more, defining the slots' geometry).")
@click.option("--mode", type=click.Choice(MODES), default="merged", show_default=True,
              help="merged: ΔW folded into the weights. compact: base + one ai.prolora::RotatedShardLoRA "
                   "node per adapted layer, shards as overridable initializers (serves many adapters).")
@click.option("--out", required=True, type=click.Path(), help="Output folder (loads with optimum.onnxruntime).")
@click.option("--task", default="auto", show_default=True,
              help="auto follows the folder's architecture (*ForCausalLM: text-generation-with-past, "
                   "*ForSequenceClassification: text-classification, else feature-extraction); or name one "
                   "of these, or text-generation (no KV cache).")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp32", show_default=True,
              help="fp16: a half-precision graph for GPU serving (the adapter op computes in fp32 inside "
                   "it); --device cpu also works and ONNX Runtime CPU runs the result, slowly, for checking.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--opset", type=int, default=None, help="ONNX opset (default: optimum's; compact needs ≥ 18).")
@click.option("--default-adapter", type=click.Choice(DEFAULT_ADAPTERS), default="adapter", show_default=True,
              help="compact only: 'zero' makes the B shards zero, so with no ONNX Runtime adapter "
                   "active the graph is the base model.")
@click.option("--op-body", type=click.Choice(["auto", *BODIES]), default="auto", show_default=True,
              help="compact only: how the op computes (same numbers). route applies the shards to the "
                   "tokens: fewest nodes, fastest when decoding one token per call. expand rebuilds A "
                   "and B from the shards per call, then LoRA's two matmuls: fastest on whole inputs. "
                   "auto: route for decoders with KV cache, expand otherwise.")
@click.option("--slots", is_flag=True,
              help="compact decoders only: adapter slots (SPEC §5): the shards are inputs with a leading slot "
                   "axis plus an adapter_index (batch,) input, so each row of a batch uses its own adapter "
                   "(-1: none); served by prolora_export.engine.")
@click.option("--quantize", type=click.Choice(list(QUANTIZE)), default="none", show_default=True,
              help="Quantize the base weights with ONNX Runtime's quantizers (as `prolora-export quantize`): "
                   "int4 (MatMulNBits + int4 embedding) or int8 (8-bit MatMulNBits); the adapter stays fp32 and "
                   "switchable.")
@quantization_options
@click.option("--validate", is_flag=True, help="Also run optimum's output check (atol 1e-5, strict for fp32).")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@adapter_read_options
@trust_remote_code_option
def command(base, adapter, mode, out, task, dtype, device, opset, default_adapter, op_body, slots, quantize,
            block_size, accuracy_level, int8_modules, validate, force, read_options) -> None:
    """Export BASE + ADAPTER to ONNX with optimum (tokenizer and config files copied).

    The folder loads with optimum.onnxruntime.ORTModelForCausalLM (decoders, exported
    with their KV cache; generates like PyTorch), ORTModelForFeatureExtraction or
    ORTModelForSequenceClassification (encoders).
    """
    refuse_inapplicable({
        "block_size": (quantize != "none", "--quantize int4 or int8"),
        "accuracy_level": (quantize != "none", "--quantize int4 or int8"),
        "int8_modules": (quantize == "int4", "--quantize int4"),
        "default_adapter": (mode == "compact" and not slots, "--mode compact without --slots"),
    })
    report, quantized = export_quantized(
        base, list(adapter), out, quantize, block_size, accuracy_level, force=force, int8_modules=int8_modules,
        mode=mode, task=task, dtype=dtype, device=device, opset=opset, default_adapter=default_adapter,
        validate=validate, op_body=op_body, slots=slots, read_options=read_options)
    click.echo(report.summary())
    if quantized is not None:
        click.echo(quantized.summary())
