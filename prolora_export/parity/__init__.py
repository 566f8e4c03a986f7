"""Parity gate: does an exported ONNX folder compute what PyTorch base + adapter computes?

Reference: the PyTorch base model with the adapter injected *unmerged* (the compact
forward of :mod:`prolora_export.shards`), in fp32 or fp64. Candidate: the ONNX folder run
by ONNX Runtime through ``optimum.onnxruntime`` (the way users will run it), on the CPU
or CUDA execution provider; a graph from ONNX Runtime GenAI's model builder (``GroupQueryAttention``, which
optimum cannot run) by ONNX Runtime alone, prefill then greedy decode through its KV cache
(:class:`.plain.PlainDecoder`), so it is judged without optimum, under transformers 5, quantized ones
(``onnx --graph builder --quantize int4|int8``: symmetric, under the builder's node names, Q/K/V packed in
merged graphs) against a reference quantized as the builder does (:mod:`.quantized`).

Why these gates and not ``max |Δlogits| ≤ 1e-5`` (optimum's validation): logits of a
real model have magnitudes of 10–30 and fp32 matmuls over hundreds of features round at
~1e-7 *relative*, so ordinary reordering of sums (fused kernels, another BLAS) moves single
logits by ~1e-5–1e-2 without changing anything a user can see; optimum flags SmolLM2's
faithful fp32 export (max diff 7.6e-3) as "not close enough". An absolute bound is
therefore both too strict for large models and too loose for small ones. What matters is

* relative error ``‖Δ‖/‖ref‖`` per prompt: scale-free, so one bound serves all models,
  and a wrong adapter (1 % off in one shard) moves it by orders of magnitude above rounding;
* KL divergence of the next-token distributions, the quantity sampling actually sees
  (large logit errors on tokens with negligible probability do not matter, small ones on
  the top candidates do);
* top-1 / top-5 agreement and greedy decoding through the KV-cache path: what a user
  observes, and the only check of the ``past_key_values`` plumbing.

Max absolute error and min cosine are reported too (cosine is gated, max-abs is not by
default). Tolerance presets, chosen from the ONNX logits dtype and the provider:

============  ========  ========  ======  ======  ========  ===========  ===========
preset        max_rel   min_cos   top1    top5    max_kl    min_greedy   layer_noise
============  ========  ========  ======  ======  ========  ===========  ===========
fp32-cpu      1e-4      0.9999    1.0     0.99    1e-4      1.0          1e-6
fp32-cuda     1e-3      0.999     0.99    0.95    1e-3      0.5          1e-4
fp16-cuda     2e-2      0.999     0.95    0.9     1e-2      0.25         2e-3
int8-cpu      0.1       0.9       0.85    0.85    0.15      –            2e-2
int4-cpu      0.1       0.9       0.85    0.85    0.15      –            2e-2
============  ========  ========  ======  ======  ========  ===========  ===========

A quantized folder (``MatMulNBits``: int4 when any weight has 4 bits, else int8) gets its preset whatever the
provider ("–": reported, not gated), and a reference quantized the same way
(:mod:`prolora_export.parity.quantized`): every weight the graph quantizes is replaced by the round trip of
the same RTN block quantization, applied to W + ΔW for a merged graph's adapter layers and to W for a compact
graph's base, with the int8 activation blocks of ``accuracy_level`` 4. Against the float model no bound could
tell int4 noise from an adapter's effect (a merged int4 export of the demo adapter that lost it passed: logits
rel 0.56, within int4's 0.78 then). What is left is the int8 activation rounding, where ORT's float32 sums and
PyTorch's part by one code now and then, and the flips compound over 30 layers: SmolLM2-135M with an adapter
that moves its logits by rel 0.22, 4 prompts, faithful exports worst rel 0.048 / KL 0.064 / top-1 0.925 /
top-5 0.916 / cosine 0.949 (int8 and int4 alike, merged and compact); the presets allow about twice that.
Measured with them there (``B`` of a merged graph: exported from such an adapter): a lost adapter (B = 0) gives
rel 0.30–0.45, KL ≥ 3.9, a wrong scale (B × 0.5) rel 0.20–0.36, KL ≥ 2.1, merged and compact, int8 and int4,
each failing every gate; a shard 2 % off fails the op check. The tiny test Llama (flat random logits): faithful
rel ≤ 1e-2, the same faults ≥ 0.39.

Adapter isolation (compact graphs, :class:`AdapterIsolation`): ``max_effect_rel`` bounds the relative
error of the adapter's effect on the logits (graph − same graph with zero B shards, against PyTorch's
(base + adapter) − base), ``max_op_rel`` that of each adapter node's output given the input the graph
fed it. fp32-cpu: 1e-3 / 1e-4 (demo, faithful export: 2.4e-5 / 3.3e-7); int8 and int4: 0.3 / 1e-4 (the
effect against the quantized reference: faithful 0.18, a lost adapter 1.0, B × 0.5 0.5). The per-op check is
independent of the base's error, so it keeps fp32's bound. The CUDA presets do not gate either (not measured).

Implementations: a compact graph's adapter op has two, the ``RotatedShardLoRA`` function body in the file (what
stock ONNX Runtime, its CUDA provider, ONNX Runtime GenAI and ``ORTModelForCausalLM`` run) and our native C++
kernel (``prolora_export/native``, what ``serve`` and the engine run on the CPU). ``kernel="auto"`` judges the
body and, where the kernel is built, the kernel too, each its own :class:`KernelVerdict`; the report passes only
when every one does (an edited body no longer hides behind a correct kernel).

``top1`` is the fraction of positions whose argmax agrees, ``top5`` the mean overlap of
the top-5 sets, ``min_greedy`` the fraction of greedy steps generated before the first
differing token (worst prompt; 1.0 = identical). fp32 on CUDA is looser because ORT's
CUDA EP may use TF32 matmuls; fp16 rounds at ~1e-3 relative per op. Every key can be
overridden (``--tolerance fp32-cpu,max_kl=1e-3``), and ``max_abs`` can be added as a gate.
``layer_noise`` is not a gate: it is the rounding scale of one layer's output that
:func:`localize` uses to tell rounding from a bug. The fp32-cpu values were checked on
SmolLM2-135M (faithful export: logits rel 2.2e-6, KL 1.7e-10, per-layer rel ≤ 1.3e-6);
the CUDA presets are estimates from the formats' unit round-off, not yet measured.

When the check fails, :func:`localize` finds the first transformer layer whose output
(the residual stream) already diverges, by running a copy of the graph with each layer's
output tensor added as a graph output and comparing with PyTorch forward hooks.

Layout (imports point down the list): :mod:`.prompts` (reading and encoding prompts), :mod:`.metrics`
(tolerances, presets, compare, gates), :mod:`.references` (PyTorch base + adapter, the adapter zeroed),
:mod:`.quantized` (the reference quantized like the graph), :mod:`.runners` (ONNX Runtime sessions, layer
outputs, localization, adapter isolation), :mod:`.plain` (a builder graph's decode loop), :mod:`.report`
(the reports and their tables); this module runs
them (:func:`check_parity`, :func:`check_genai_parity`, :func:`heldout_loss`) and re-exports the public names.
"""

from __future__ import annotations

import contextlib
import itertools
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import PRoLoRAError
from ..formats.reference import ReadOptions
from ..models import load_config, resolve_model
from ..onnx.graph import is_builder_graph
from ..onnx.quantize import quantized_bits
from ..runtime import inference_session, require_provider
from .metrics import GATES, PRESETS, PromptResult, Tolerance, compare, judge, parse_tolerance
from .plain import PlainDecoder
from .prompts import (
    DEFAULT_PROMPTS,
    Prompt,
    _load_tokenizer,
    _pad_id,
    check_prompt_lengths,
    encode_prompts,
    read_prompts,
)
from .references import B_TENSORS, REFERENCE_DTYPES, _greedy, _reference_model, _zero_adapter, eos_ids
from .report import KERNEL_USERS, GenaiParityReport, KernelVerdict, ParityReport
from .runners import (
    AdapterIsolation,
    _folder_config,
    _onnx_file,
    _onnx_inputs,
    _ort_model,
    _read_onnx,
    adapter_nodes,
    check_comparable,
    judged_kernels,
    localize,
    onnx_task,
)

# ---------------------------------------------------------------------- quality in task terms


def heldout_loss(onnx_dir: str | Path, data: str | Path, provider: str = "cpu", max_length: int = 256,
                 threads: int | None = None) -> float:
    """Mean loss per labelled token of an exported causal LM on a JSONL data file, computed by ONNX Runtime.

    The same examples and labels as training's evaluation (:func:`prolora_export.data.load_dataset`:
    assistant turns / completions only), one example per call, so a quantized export's quality is
    stated in the task's own terms beside the fp32 export's.
    """
    import numpy as np

    from ..data import IGNORE_INDEX, load_dataset
    from ..onnx.adapters import decoder_feeds

    folder = Path(onnx_dir)
    session = inference_session(_onnx_file(folder), provider, threads=threads)
    config = _folder_config(folder)  # sizes a builder graph's symbolic cache dims
    examples = load_dataset(data, _load_tokenizer(folder), max_length)
    total, count = 0.0, 0
    for example in examples:
        ids = np.asarray([example.input_ids], dtype=np.int64)
        logits = torch.from_numpy(session.run(["logits"], decoder_feeds(session, ids, config))[0][0]).double()
        labels = torch.tensor(example.labels[1:])
        keep = labels != IGNORE_INDEX
        total += float(torch.nn.functional.cross_entropy(logits[:-1][keep], labels[keep], reduction="sum"))
        count += int(keep.sum())
    return total / max(count, 1)


# ---------------------------------------------------------------------- entry point


def check_parity(
    base: str,
    adapter: str | Path,
    onnx_dir: str | Path,
    provider: str = "cpu",
    prompts: list[Prompt] | None = None,
    max_new_tokens: int = 16,
    tolerance: str | None = None,
    reference_dtype: str = "fp32",
    progress: bool = True,
    read_options: ReadOptions | None = None,
    kernel: str = "auto",
) -> ParityReport:
    """Compare the ONNX folder under ONNX Runtime with PyTorch base + adapter (unmerged); see the module doc.

    The adapter folder is read by the one reader (``read_options``: reference checkpoints, pickle).
    ``kernel`` (runtime.KERNELS) chooses which implementations of the compact op are judged
    (:func:`judged_kernels`): ``auto`` the graph's function body and, where it is built, the native kernel,
    each reported, the report passing only when both do. A quantized graph is compared with a reference
    quantized the same way (:mod:`.quantized`)."""
    import onnx
    from tqdm.auto import tqdm

    if reference_dtype not in REFERENCE_DTYPES:
        raise PRoLoRAError(f"unknown reference dtype '{reference_dtype}' (expected fp32 or fp64)")
    if max_new_tokens < 0:
        raise PRoLoRAError("must be ≥ 0", "--max-new-tokens")
    require_provider(provider)
    folder = Path(onnx_dir)
    onnx_path = _onnx_file(folder)
    proto = _read_onnx(onnx_path)
    graph = proto.graph
    if not graph.output:
        raise PRoLoRAError("the ONNX graph has no outputs", str(onnx_path))
    outputs = [o.name for o in graph.output]
    graph_inputs = {i.name for i in graph.input}
    onnx_dtype = "fp16" if graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 else "fp32"
    bits, compact, builder = quantized_bits(graph), bool(adapter_nodes(graph)), is_builder_graph(graph)
    kernels = judged_kernels(provider, kernel, graph)
    # a quantized base is judged by the bounds measured for its quantization (CPU: where they were measured)
    preset, tol = parse_tolerance(tolerance, f"int{bits}-cpu" if bits else f"{onnx_dtype}-{provider}")
    prompts = list(prompts) if prompts is not None else list(DEFAULT_PROMPTS)
    if not prompts:
        raise PRoLoRAError("no prompts given")

    # everything about the inputs is checked before a model is loaded
    onnx_config, base_config = _folder_config(folder), load_config(base)
    check_comparable(base_config, onnx_config, base, folder)
    task = onnx_task(outputs, onnx_config)
    decoder = task.startswith("text-generation")
    generate = task == "text-generation-with-past" and max_new_tokens > 0
    encoded, tokenizer = encode_prompts(prompts, [folder, resolve_model(base)], decoder, graph_inputs)
    check_prompt_lengths(encoded, [base_config, onnx_config], max_new_tokens if generate else 0)
    reference = _reference_model(base, adapter, task, REFERENCE_DTYPES[reference_dtype], read_options,
                                 onnx_path if compact else None)
    description = ParityReport.reference
    if bits:
        from .quantized import quantize_reference

        done = quantize_reference(reference, proto, merged=not compact, provider=provider, builder=builder)
        description += f", quantized as the graph: {done.describe()}" + (f" ({done.note})" if done.note else "")
    del graph, proto
    pad_id = _pad_id(tokenizer, base_config)
    output_name = "last_hidden_state" if task == "feature-extraction" else "logits"

    expected = []  # the reference's output and greedy tokens per prompt, shared by every verdict
    for inputs in encoded:
        with torch.no_grad():
            out = getattr(reference(**inputs), output_name)
            expected.append((out, _greedy(reference, inputs, max_new_tokens, pad_id) if generate else []))
    report = ParityReport(
        base=str(base), adapter=str(adapter), onnx=str(folder), task=task, provider=provider,
        onnx_dtype=onnx_dtype, reference_dtype=reference_dtype, preset=preset, tolerance=tol,
        max_new_tokens=max_new_tokens if generate else 0, reference=description,
        verdicts=[],
    )

    def judge_one(name: str, session_kernel: str) -> KernelVerdict:
        """Every prompt through the graph with the adapter op run as ``session_kernel``, against the reference."""
        candidate = (PlainDecoder(onnx_path, provider, session_kernel, onnx_config) if builder
                     else _ort_model(folder, task, provider, session_kernel))
        isolation = AdapterIsolation(reference, onnx_path, provider, output_name, session_kernel) if compact else None
        results: list[PromptResult] = []
        try:
            for prompt, inputs, (ref_out, ref_tokens) in tqdm(list(zip(prompts, encoded, expected, strict=True)),
                                                              desc=f"parity ({name})", unit="prompt",
                                                              disable=not progress):
                with torch.no_grad():
                    cand_out = getattr(candidate(**_onnx_inputs(candidate, inputs)), output_name)
                metrics = compare(ref_out, torch.as_tensor(cand_out), distribution=output_name == "logits")
                if isolation is not None:
                    metrics.update(isolation.measure(inputs, ref_out))
                result = PromptResult(prompt, inputs["input_ids"].shape[1], metrics)
                if generate:
                    with torch.no_grad():
                        result.greedy_reference = ref_tokens
                        result.greedy_onnx = (candidate.greedy(inputs, max_new_tokens, eos_ids(reference)) if builder
                                              else _greedy(candidate, inputs, max_new_tokens, pad_id))
                    pairs = list(zip(result.greedy_reference, result.greedy_onnx, strict=True))
                    result.first_divergence = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
                    matched = len(pairs) if result.first_divergence is None else result.first_divergence
                    metrics["greedy"] = matched / max_new_tokens
                results.append(result)
        finally:
            if isolation is not None:
                isolation.close()
        return KernelVerdict(name, list(candidate.providers), results)

    sessions = {name: kernel if name == "none" else name for name in kernels}  # none: merged, as asked
    report.verdicts = [judge_one(name, session) for name, session in sessions.items()]
    report.decide()
    noise = tol.layer_noise if tol.layer_noise is not None else PRESETS[f"{onnx_dtype}-cuda"].layer_noise
    for verdict in report.verdicts:
        if not verdict.passed:
            worst = max(range(len(verdict.prompts)), key=lambda i: verdict.prompts[i].metrics["rel"])
            try:
                verdict.localization = localize(reference, onnx_path, provider, encoded[worst], noise, worst,
                                                sessions[verdict.kernel])
            except PRoLoRAError as err:
                verdict.localization = {"layer": None, "note": f"could not localize: {err}"}
    return report


def check_genai_parity(base: str, adapter: str | Path, onnx_dir: str | Path, prompts: list[Prompt] | None = None,
                       max_new_tokens: int = 16, read_options: ReadOptions | None = None) -> GenaiParityReport:
    """Generate greedily in onnxruntime-genai and in PyTorch, and compare the tokens (up to the first eos,
    where genai stops). A compact graph is also run with the adapter made an ``.onnx_adapter`` file and
    activated through ``og.Adapters``; a zero-default graph without it must give the base model."""
    import onnxruntime_genai as og

    from ..onnx.adapters import export_onnx_adapter, read_record
    from ..onnx.genai import genai_greedy, genai_model

    folder = Path(onnx_dir)
    if not (folder / "genai_config.json").is_file():
        raise PRoLoRAError("no genai_config.json: export it again with this version (decoders with their KV cache)",
                           str(folder))
    try:
        defaults = read_record(folder).get("defaults")
    except PRoLoRAError:
        defaults = None  # merged: nothing to switch
    if defaults == "slots":
        raise PRoLoRAError("a slot graph needs adapter_index, which onnxruntime-genai does not feed", str(folder))
    prompts = prompts or DEFAULT_PROMPTS
    encoded, tokenizer = encode_prompts(prompts, [folder, resolve_model(base)], True, {"input_ids", "attention_mask"})
    reference = _reference_model(base, adapter, "text-generation", torch.float32, read_options)
    stops = set(eos_ids(reference))
    pad = _pad_id(tokenizer, reference.config)

    def expected(inputs: dict[str, torch.Tensor], base_only: bool) -> list[int]:
        """PyTorch's greedy tokens, stopping at eos as genai does (``_greedy`` forbids eos to make
        exactly n tokens); the eos itself is dropped, since genai's sequence ends before it."""
        from transformers import GenerationConfig

        config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, num_beams=1, pad_token_id=pad,
                                  eos_token_id=sorted(stops) or None)
        with torch.no_grad(), _zero_adapter(reference) if base_only else contextlib.nullcontext():
            tokens = reference.generate(**inputs, generation_config=config)[0, inputs["input_ids"].shape[1]:].tolist()
        return list(itertools.takewhile(lambda t: t not in stops, tokens))

    model = genai_model(folder)  # the native kernel registered where it was built, as users run it
    runs: dict[str, tuple[Any, bool]] = {"graph defaults": (None, defaults == "zero")}
    with tempfile.TemporaryDirectory(prefix="prolora-genai-") as scratch:
        if defaults is not None:
            file = export_onnx_adapter(adapter, Path(scratch) / "adapter.onnx_adapter", read_options=read_options,
                                       graph=folder).out
            adapters = og.Adapters(model)
            adapters.load(str(file), "adapter")
            runs["og.Adapters"] = ((adapters, "adapter"), False)
        report = GenaiParityReport(str(folder))
        for name, (active, base_only) in runs.items():
            results = []
            for inputs in encoded:
                ids = inputs["input_ids"][0].tolist()
                want, got = expected(inputs, base_only), genai_greedy(model, ids, max_new_tokens, active)
                diverge = next((i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b),
                               None if len(want) == len(got) else min(len(want), len(got)))
                results.append({"expected": want, "genai": got, "identical": diverge is None,
                                "first_divergence": diverge})
            report.runs[name] = results
    return report


__all__ = ["B_TENSORS", "DEFAULT_PROMPTS", "GATES", "KERNEL_USERS", "PRESETS", "REFERENCE_DTYPES", "AdapterIsolation",
           "GenaiParityReport", "KernelVerdict", "ParityReport", "Prompt", "PromptResult", "Tolerance",
           "adapter_nodes", "check_genai_parity", "check_parity", "compare", "encode_prompts", "heldout_loss", "judge",
           "judged_kernels", "localize", "onnx_task", "parse_tolerance", "read_prompts"]
