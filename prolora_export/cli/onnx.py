"""``prolora-export onnx``: export base + adapter to an ONNX folder (merged or compact), with optimum or
ONNX Runtime GenAI's model builder writing the graph (``--graph``)."""

import click

from ..onnx.export import DEFAULT_ADAPTERS, DTYPES, MODES
from ..onnx.graph.builder import ARCHITECTURES, BUILDER_TASKS, GRAPHS
from ..onnx.op import BODIES
from ..onnx.quantize import DEFAULT_ACCURACY_LEVEL, DEFAULT_BLOCK_SIZE, QUANTIZE, export_quantized
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


def export_graph(base: str, adapters: list, out: str, *, graph: str = "auto", mode: str = "merged",
                 task: str = "auto", dtype: str = "fp32", device: str = "cpu", opset: int | None = None,
                 default_adapter: str = "adapter", op_body: str = "auto", slots: bool = False, quantize: str = "none",
                 block_size: int = DEFAULT_BLOCK_SIZE, accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
                 int8_modules: tuple[str, ...] = (), validate: bool = False, force: bool = False,
                 read_options=None) -> list[str]:
    """``prolora-export onnx`` for Python callers (the examples): the route ``graph`` picks
    (:func:`..onnx.graph.builder.choose_graph`), then the optimum export or the builder's; options only
    optimum has are refused on the builder route in one line. Returns the lines the command prints."""
    from ..errors import PRoLoRAError
    from ..onnx.graph.builder import choose_graph

    execution_provider = builder_execution_provider(dtype, device)
    if choose_graph(graph, base, task, execution_provider) == "builder":
        given = [name for name, used in (("opset", opset is not None), ("validate", validate),
                                         ("int8-modules", bool(int8_modules))) if used]
        if given:
            raise PRoLoRAError(f"--{given[0]} applies only to --graph optimum")
        return export_with_builder(base, adapters, out, mode=mode, dtype=dtype, device=device,
                                   default_adapter=default_adapter, op_body=op_body, slots=slots, quantize=quantize,
                                   block_size=block_size, accuracy_level=accuracy_level, force=force,
                                   read_options=read_options)
    report, quantized = export_quantized(
        base, adapters, out, quantize, block_size, accuracy_level, force=force, int8_modules=int8_modules,
        mode=mode, task=task, dtype=dtype, device=device, opset=opset, default_adapter=default_adapter,
        validate=validate, op_body=op_body, slots=slots, read_options=read_options)
    return [report.summary(), *([quantized.summary()] if quantized is not None else [])]


#: the execution provider the model builder writes every fp16 graph for: its CPU one (``-e cpu -p fp16``:
#: MultiHeadAttention with position_ids) fails its first decode step in ONNX Runtime 1.32 ("Shape mismatch
#: attempting to re-use buffer"), while its CUDA one (GroupQueryAttention, which has an fp16 CPU kernel) runs
#: on ORT's CPU provider too, spliced op included (tests/test_builder_fp16.py)
FP16_EXECUTION_PROVIDER = "cuda"
FP16_ON_CPU = ("fp16 graph built for CUDA, whatever --device says (the model builder's CPU fp16 graph does not run "
               "in ONNX Runtime 1.32); ONNX Runtime's CPU provider runs it, slowly, for checking; its "
               "genai_config.json names CUDA")


def builder_execution_provider(dtype: str, device: str) -> str:
    """The execution provider the model builder writes the graph for: ``device``, but CUDA for fp16
    (:data:`FP16_EXECUTION_PROVIDER`)."""
    return FP16_EXECUTION_PROVIDER if dtype == "fp16" else device


def export_with_builder(base: str, adapters: list, out: str, *, mode: str, dtype: str, device: str,
                        default_adapter: str, op_body: str, slots: bool, quantize: str, block_size: int,
                        accuracy_level: int, force: bool, read_options) -> list[str]:
    """``onnx --graph builder``: the builder on the merged model (merged), or the builder's graph of the base
    with the adapter spliced in (compact, slots); the same refusals as the optimum route's, in one line.
    Returns the summary lines (fp16 says for which execution provider it was built)."""
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
    execution_provider = builder_execution_provider(dtype, device)
    quantization = {"block_size": block_size, "accuracy_level": accuracy_level} if quantize != "none" else {}
    hf_dir = local_model_dir(base)
    if mode == "merged":
        report = build_merged(hf_dir, adapters[0], out, precision, execution_provider, force=force,
                              read_options=read_options, **quantization)
    else:
        loaded = [read_source(a, str(hf_dir), read_options).adapter for a in adapters]
        if slots:
            check_geometry_agrees(loaded, [str(a) for a in adapters])
        report = build_compact(hf_dir, loaded[0], out, precision, execution_provider, slots=slots,
                               default_adapter=default_adapter, body=op_body_for(BUILDER_TASKS[1], op_body),
                               force=force, **quantization)
    return [report.summary(), *([FP16_ON_CPU] if execution_provider != device else [])]
