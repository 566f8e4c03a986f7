"""``prolora-export onnx``: export base + adapter to an ONNX folder (merged or compact), with optimum or
ONNX Runtime GenAI's model builder writing the graph (``--graph``)."""

import click

from ..onnx.export import DEFAULT_ADAPTERS, DTYPES, MODES
from ..onnx.graph.builder import ARCHITECTURES, GRAPHS
from ..onnx.op import BODIES
from ..onnx.quant_settings import QUANTIZE
from ..onnx.route import export_graph
from . import trust_remote_code_option
from .options import adapter_read_options, quantization_options
from .types import refuse_inapplicable

BUILDER_ARCHITECTURES = ", ".join(a.removesuffix("ForCausalLM") for a in ARCHITECTURES)


@click.command("onnx")
@click.option("--base", required=True, help="Base model: folder, hub id or 'smollm2-135m'.")
@click.option("--adapter", required=True, multiple=True, type=click.Path(),
              help="Adapter folder: PRoLoRA, PEFT LoRA or a reference PRoLoRA checkpoint (with --slots: one or "
                   "more, defining the slots' geometry).")
@click.option("--mode", type=click.Choice(MODES), default="merged", show_default=True,
              help="merged: ΔW folded into the weights. compact: base + one ai.prolora::RotatedShardLoRA "
                   "node per adapted layer, shards as overridable initializers (serves many adapters).")
@click.option("--out", required=True, type=click.Path(), help="Output folder (loads with optimum.onnxruntime).")
@click.option("--graph", type=click.Choice(GRAPHS), default="auto", show_default=True,
              help=f"Who writes the graph. builder: ONNX Runtime GenAI's model builder (onnxruntime-genai 0.18 "
                   f"and transformers >= 5; causal LMs {BUILDER_ARCHITECTURES}): fused attention, faster "
                   "decode, a genai_config.json; compact graphs get the adapter op spliced in; merged graphs "
                   "are the builder on the merged weights. optimum: every other architecture, encoders "
                   "(BERT …), --task, --opset, --validate, --int8-modules, transformers < 4.58. auto: builder "
                   "where it applies, else optimum.")
@click.option("--task", default="auto", show_default=True,
              help="auto follows the folder's architecture (*ForCausalLM: text-generation-with-past, "
                   "*ForSequenceClassification: text-classification, else feature-extraction); or name one "
                   "of these, or text-generation (no KV cache).")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp32", show_default=True,
              help="fp16: a half-precision graph for GPU serving (the adapter op computes in fp32 inside "
                   "it); ONNX Runtime CPU runs the result too, slowly, for checking (builder: fp16 is built for "
                   "CUDA whatever --device says: its CPU fp16 graph does not run in ONNX Runtime 1.32).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="optimum: where the model is traced; builder: the execution provider the graph is built for "
                   "(fp16: CUDA).")
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
                   "(-1: none); served by prolora_export.engine (builder: no genai_config.json, genai does "
                   "not feed those inputs).")
@click.option("--quantize", type=click.Choice(list(QUANTIZE)), default="none", show_default=True,
              help="Quantize the base weights: int4 or int8 blockwise MatMulNBits projections; the adapter stays "
                   "float and switchable. optimum: ONNX Runtime's quantizers on the exported graph (as "
                   "`prolora-export quantize`; int4 also quantizes the embedding). builder: its own -p int4/int8 "
                   "(symmetric; embedding float).")
@quantization_options
@click.option("--validate", is_flag=True, help="Also run optimum's output check (atol 1e-5, strict for fp32).")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@adapter_read_options
@trust_remote_code_option
def command(base, adapter, mode, out, graph, task, dtype, device, opset, default_adapter, op_body, slots, quantize,
            block_size, accuracy_level, int8_modules, validate, force, read_options) -> None:
    """Export BASE + ADAPTER to ONNX with optimum or the model builder (tokenizer and config files copied).

    optimum folders load with optimum.onnxruntime.ORTModelForCausalLM (decoders, exported
    with their KV cache; generates like PyTorch), ORTModelForFeatureExtraction or
    ORTModelForSequenceClassification (encoders). Model-builder folders are decoders with
    GroupQueryAttention over one shared past/present buffer (no position_ids), and load with
    onnxruntime_genai.Model (compact: og.Adapters switch the shards).
    """
    refuse_inapplicable({
        "block_size": (quantize != "none", "--quantize int4 or int8"),
        "accuracy_level": (quantize != "none", "--quantize int4 or int8"),
        "int8_modules": (quantize == "int4", "--quantize int4"),
        "default_adapter": (mode == "compact" and not slots, "--mode compact without --slots"),
    })
    for line in export_graph(base, list(adapter), out, graph=graph, mode=mode, task=task, dtype=dtype, device=device,
                             opset=opset, default_adapter=default_adapter, op_body=op_body, slots=slots,
                             quantize=quantize, block_size=block_size, accuracy_level=accuracy_level,
                             int8_modules=int8_modules, validate=validate, force=force, read_options=read_options):
        click.echo(line)
