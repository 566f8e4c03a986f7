"""Which tool writes an ONNX export, and the builder's route end to end: ``prolora-export onnx`` and
Python callers (:func:`export_graph`, ``prolora_export.export_graph``) take the same route.

``graph="auto"`` is :func:`.graph.builder.choose_graph`: ONNX Runtime GenAI's model builder for the decoders
it builds exactly (where it is installed), else optimum (:func:`.quantize.export_quantized`, which exports
with :func:`.export.export_onnx` and quantizes when asked).
"""

from __future__ import annotations

from .quant_settings import DEFAULT_ACCURACY_LEVEL, DEFAULT_BLOCK_SIZE
from .quantize import export_quantized


def export_graph(base: str, adapters: list, out: str, *, graph: str = "auto", mode: str = "merged",
                 task: str = "auto", dtype: str = "fp32", device: str = "cpu", opset: int | None = None,
                 default_adapter: str = "adapter", op_body: str = "auto", slots: bool = False, quantize: str = "none",
                 block_size: int = DEFAULT_BLOCK_SIZE, accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
                 int8_modules: tuple[str, ...] = (), validate: bool = False, force: bool = False,
                 read_options=None) -> list[str]:
    """``prolora-export onnx`` for Python callers: the route ``graph`` picks
    (:func:`..onnx.graph.builder.choose_graph`), then the optimum export or the builder's; options only
    optimum has are refused on the builder route in one line. Returns the lines the command prints."""
    from ..errors import PRoLoRAError
    from .graph.builder import choose_graph

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
    from .export import op_body_for
    from .graph.builder import BUILDER_TASKS, build_merged, local_model_dir
    from .graph.splice import build_compact
    from .slots import check_geometry_agrees

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
