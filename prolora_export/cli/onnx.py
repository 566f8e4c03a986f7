"""``prolora-export onnx``: export base + adapter to an ONNX folder (merged or compact), with optimum or
ONNX Runtime GenAI's model builder writing the graph (``--graph``)."""

import click

from ..onnx.export import DEFAULT_ADAPTERS, DTYPES, MODES
from ..onnx.graph.builder import ARCHITECTURES, BUILDER_TASKS, GRAPHS
from ..onnx.op import BODIES
from ..onnx.quantize import QUANTIZE, export_quantized
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
                   "it); --device cpu also works and ONNX Runtime CPU runs the result, slowly, for checking.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="optimum: where the model is traced; builder: the execution provider the graph is built for.")
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
    from ..onnx.graph.builder import choose_graph

    refuse_inapplicable({
        "block_size": (quantize != "none", "--quantize int4 or int8"),
        "accuracy_level": (quantize != "none", "--quantize int4 or int8"),
        "int8_modules": (quantize == "int4", "--quantize int4"),
        "default_adapter": (mode == "compact" and not slots, "--mode compact without --slots"),
    })
    if choose_graph(graph, base, task, device) == "builder":
        refuse_inapplicable({name: (False, "--graph optimum") for name in ("opset", "validate", "int8_modules")})
        export_with_builder(base, list(adapter), out, mode=mode, dtype=dtype, device=device,
                            default_adapter=default_adapter, op_body=op_body, slots=slots, quantize=quantize,
                            block_size=block_size, accuracy_level=accuracy_level, force=force,
                            read_options=read_options)
        return
    report, quantized = export_quantized(
        base, list(adapter), out, quantize, block_size, accuracy_level, force=force, int8_modules=int8_modules,
        mode=mode, task=task, dtype=dtype, device=device, opset=opset, default_adapter=default_adapter,
        validate=validate, op_body=op_body, slots=slots, read_options=read_options)
    click.echo(report.summary())
    if quantized is not None:
        click.echo(quantized.summary())


def export_with_builder(base: str, adapters: list, out: str, *, mode: str, dtype: str, device: str,
                        default_adapter: str, op_body: str, slots: bool, quantize: str, block_size: int,
                        accuracy_level: int, force: bool, read_options) -> None:
    """``onnx --graph builder``: the builder on the merged model (merged), or the builder's graph of the base
    with the adapter spliced in (compact, slots); the same refusals as the optimum route's, in one line."""
    from ..convert import read_source
    from ..errors import PRoLoRAError
    from ..onnx.export import op_body_for
    from ..onnx.graph.builder import build_merged, local_model_dir
    from ..onnx.graph.splice import build_compact
    from ..onnx.slots import check_geometry_agrees

    if quantize != "none" and dtype != "fp32":
        raise PRoLoRAError("--quantize needs --dtype fp32 (the builder quantizes from float32)")
    if slots and mode != "compact":
        raise PRoLoRAError("--slots applies to --mode compact only")
    if len(adapters) != 1 and not slots:
        raise PRoLoRAError(f"one --adapter expected, got {len(adapters)} (several only with --slots)")
    if op_body != "auto" and mode != "compact":
        raise PRoLoRAError("--op-body applies to --mode compact only (a merged export has no adapter op)")
    if slots and op_body not in ("auto", "route"):
        raise PRoLoRAError("--slots has the route op body only")
    precision = dtype if quantize == "none" else quantize
    quantization = {"block_size": block_size, "accuracy_level": accuracy_level} if quantize != "none" else {}
    hf_dir = local_model_dir(base)
    if mode == "merged":
        report = build_merged(hf_dir, adapters[0], out, precision, device, force=force, read_options=read_options,
                              **quantization)
    else:
        loaded = [read_source(a, str(hf_dir), read_options).adapter for a in adapters]
        if slots:
            check_geometry_agrees(loaded, [str(a) for a in adapters])
        report = build_compact(hf_dir, loaded[0], out, precision, device, slots=slots,
                               default_adapter=default_adapter, body=op_body_for(BUILDER_TASKS[1], op_body),
                               force=force, **quantization)
    click.echo(report.summary())
