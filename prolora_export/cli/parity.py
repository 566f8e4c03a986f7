"""``prolora-export parity``: the gate between an ONNX export and PyTorch base + adapter."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..outputs import atomic_output_file, check_destination
from ..parity import DEFAULT_PROMPTS, PRESETS, check_genai_parity, check_parity, read_prompts
from ..runtime import KERNELS
from . import trust_remote_code_option
from .options import adapter_read_options
from .types import refuse_inapplicable

#: the preset gates --help shows: (label, Tolerance field, comparison)
HELP_GATES = (("rel", "max_rel", "≤"), ("cos", "min_cos", "≥"), ("top1", "min_top1", "≥"), ("top5", "min_top5", "≥"),
              ("KL", "max_kl", "≤"), ("greedy", "min_greedy", "≥"))
PRESET_HELP = "; ".join(
    f"{name}: " + " ".join(f"{label}{cmp}{getattr(t, key):g}" if getattr(t, key) is not None else f"{label} –"
                           for label, key, cmp in HELP_GATES)
    for name, t in PRESETS.items()
    if name != "fp16-cpu"
)


@click.command("parity", epilog="\b\nPresets (default: from the ONNX logits dtype and --provider; – reported, not "
                                "gated):\n" + "\n".join(
    f"  {line}" for line in PRESET_HELP.split("; ")
))
@click.option("--base", required=True, help="Base model: local HF folder, hub id or smollm2-135m.")
@click.option("--adapter", required=True, type=click.Path(path_type=Path),
              help="Adapter folder (PRoLoRA, PEFT LoRA or a reference PRoLoRA checkpoint).")
@click.option("--onnx", "onnx_dir", required=True, type=click.Path(path_type=Path),
              help="Exported ONNX folder (model.onnx + config + tokenizer), merged or compact.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="ONNX Runtime execution provider; cuda fails (exit 2) if ORT would fall back to CPU.")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), default=None,
              help=f"One prompt per line, or JSONL {{\"prompt\": …}} or {{\"input_ids\": [token ids]}} (token ids "
                   f"need no tokenizer). Default: {len(DEFAULT_PROMPTS)} built-in ones.")
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=16, show_default=True,
              help="Greedy tokens generated through the KV cache on each prompt (0: skip).")
@click.option("--tolerance", default=None, metavar="PRESET[,KEY=VALUE…]",
              help="A preset and/or overrides, e.g. 'fp16-cuda' or 'max_rel=1e-3,max_kl=off'. Keys: max_rel "
                   "min_cos min_top1 min_top5 max_kl min_greedy max_abs (gates), layer_noise (localization).")
@click.option("--reference-dtype", type=click.Choice(["fp32", "fp64"]), default="fp32", show_default=True,
              help="dtype of the PyTorch reference.")
@click.option("--kernel", type=click.Choice(KERNELS), default="auto", show_default=True,
              help="Which implementation of the compact op is judged: auto judges the graph's ONNX function body "
                   "(what stock ONNX Runtime, CUDA, ORT GenAI and ORTModelForCausalLM run) and, when built, the "
                   "native C++ kernel (what serve runs), each reported, PASS only if both pass; function or "
                   "native judge that one alone (native: an error if not built). CUDA runs the body.")
@click.option("--runtime", type=click.Choice(["ort", "genai"]), default="ort", show_default=True,
              help="ort: ONNX Runtime (through optimum; a model builder graph by a plain decode loop, no optimum "
                   "needed), every logit gated. genai: greedy tokens from "
                   "onnxruntime-genai (the folder's genai_config.json), with the graph's own shards and, for a "
                   "compact graph, with the adapter switched in through og.Adapters.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), default=None,
              help="Also write the full report as JSON here.")
@adapter_read_options
@trust_remote_code_option
def command(base, adapter, onnx_dir, provider, prompts_file, max_new_tokens, tolerance, reference_dtype,
            kernel, runtime, report_path, read_options) -> None:
    """Prove that an ONNX export computes what PyTorch base + adapter (unmerged) computes.

    Runs every prompt through both, compares logits at every position (relative error,
    KL of next-token distributions, top-1/top-5 agreement, min cosine; max abs error is
    only reported, since an absolute bound misjudges fp32 rounding on real models) and
    compares greedy generation through the KV cache. When the check fails it names the
    first transformer layer whose output diverges. A quantized graph is compared with
    PyTorch quantized the same way (RTN blocks as the graph's), so a lost adapter fails.

    Exit code: 0 within tolerance, 1 not within tolerance, 2 bad usage or inputs.
    """
    if report_path is not None:  # a report that cannot be written fails now, not after the whole run
        check_destination(report_path, force=True, kind="file", inputs={
            "base model": base, "adapter folder": adapter, "ONNX folder": onnx_dir, "prompts file": prompts_file})
    if runtime == "genai":
        refuse_inapplicable({name: (False, "--runtime ort") for name in
                             ("provider", "tolerance", "reference_dtype", "kernel")})
        report = check_genai_parity(base, adapter, onnx_dir, prompts=read_prompts(prompts_file),
                                    max_new_tokens=max_new_tokens, read_options=read_options)
    else:
        report = check_parity(base, adapter, onnx_dir, provider=provider, prompts=read_prompts(prompts_file),
                              max_new_tokens=max_new_tokens, tolerance=tolerance, reference_dtype=reference_dtype,
                              read_options=read_options, kernel=kernel)
    click.echo(report.table())
    if report_path is not None:
        with atomic_output_file(report_path, force=True) as tmp:
            tmp.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")
        click.echo(f"report written to {report_path}")
    if not report.passed:
        raise SystemExit(1)
