"""Parity's candidate: the ONNX folder read and run by ONNX Runtime (optimum's ORTModel classes, or for a model
builder graph :class:`.plain.PlainDecoder`, with the adapter op run as its function body or our native kernel),
layer outputs taken out of the graph to localize a divergence, and the adapter checked apart from the base
(:class:`AdapterIsolation`)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import PRoLoRAError
from ..onnx.adapters import empty_past
from ..runtime import NATIVE_OPS, check_providers, inference_session, kernel_library, require_provider, session_options
from .metrics import _worst, compare
from .references import B_TENSORS, _zero_adapter

# ---------------------------------------------------------------------- the ONNX folder


def _read_onnx(onnx_path: Path):
    """The ModelProto without its external weights; a damaged file is one clear error, not a traceback."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        return onnx.load(str(onnx_path), load_external_data=False)
    except (DecodeError, ValueError, OSError) as err:
        raise PRoLoRAError(f"not a valid ONNX model ({str(err)[:200] or type(err).__name__})", str(onnx_path)) from None


def _onnx_file(folder: Path) -> Path:
    if not folder.is_dir():
        raise PRoLoRAError("ONNX folder not found" if not folder.exists() else "not a folder", str(folder))
    files = sorted(folder.glob("*.onnx"))
    if not files:
        raise PRoLoRAError("no *.onnx file in the folder (expected an exported model folder)", str(folder))
    named = [f for f in files if f.name == "model.onnx"]
    return named[0] if named else files[0]


def onnx_task(graph_outputs: list[str], config) -> str:
    """The optimum task an ONNX folder was exported for, from its outputs and config."""
    arches = " ".join(getattr(config, "architectures", None) or [])
    if "logits" in graph_outputs and any(o.startswith("present") for o in graph_outputs):
        return "text-generation-with-past"
    if "logits" in graph_outputs and ("CausalLM" in arches or "LMHeadModel" in arches):
        return "text-generation"
    if "logits" in graph_outputs:
        return "text-classification"
    if "last_hidden_state" in graph_outputs:
        return "feature-extraction"
    raise PRoLoRAError(f"cannot tell the task from the graph outputs {graph_outputs[:4]} (expected logits or "
                       "last_hidden_state)")


def _folder_config(folder: Path):
    """The ONNX folder's transformers config (its architectures tell a classifier from a causal LM)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise PRoLoRAError(f"no readable config.json ({str(err).strip().splitlines()[0][:200]})", str(folder)) from None


def check_comparable(base_config, onnx_config, base: str, folder: Path) -> None:
    """One clear line, before any loading, when the base and the ONNX folder cannot be compared at all."""
    for config, where in ((base_config, base), (onnx_config, str(folder))):
        if getattr(config, "is_encoder_decoder", False):
            raise PRoLoRAError(f"{config.model_type} is an encoder-decoder (seq2seq) model: parity compares "
                               "decoder-only models and encoders, what `prolora-export onnx` exports", where)
    if base_config.model_type != onnx_config.model_type:
        raise PRoLoRAError(f"was exported from a {onnx_config.model_type} model, but --base {base} is a "
                           f"{base_config.model_type} model: pass the base the export was made from", str(folder))


# ---------------------------------------------------------------------- ONNX Runtime


def _ort_model(folder: Path, task: str, provider: str, kernel: str = "auto"):
    """Load the folder with optimum's ORTModel class for the task; fail when CUDA was asked and not used."""
    try:  # optimum is the optional ``onnx`` extra: a model builder folder is judged without it
        from optimum.onnxruntime import (
            ORTModelForCausalLM,
            ORTModelForFeatureExtraction,
            ORTModelForSequenceClassification,
        )
    except ImportError:
        raise PRoLoRAError("judging an optimum export needs optimum-onnx (pip install 'prolora-export[onnx]'); "
                           "model builder folders need only onnxruntime", str(folder)) from None

    wanted = require_provider(provider)
    cls = {"text-generation-with-past": ORTModelForCausalLM, "text-generation": ORTModelForCausalLM,
           "feature-extraction": ORTModelForFeatureExtraction,
           "text-classification": ORTModelForSequenceClassification}[task]
    kwargs = {"use_cache": task == "text-generation-with-past"} if cls is ORTModelForCausalLM else {}
    try:
        model = cls.from_pretrained(folder, provider=wanted, use_io_binding=False,
                                    session_options=session_options(provider, kernel=kernel), **kwargs)
    except PRoLoRAError:
        raise
    except Exception as err:  # ORT and optimum raise many types; the user needs one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PRoLoRAError(f"ONNX Runtime cannot load the model: {first[:300]}", str(folder)) from None
    check_providers(list(model.providers), provider)
    return model


def _onnx_inputs(model, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = set(model.input_names) if hasattr(model, "input_names") else set(inputs)
    out = {k: v for k, v in inputs.items() if k in names}
    if "token_type_ids" in names and "token_type_ids" not in out:
        out["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    return out


# ---------------------------------------------------------------------- localization

#: how much more error than it received a layer must add to be named as the culprit
JUMP = 5.0
LAYER_NODE = re.compile(r"^/(.+?/(?:layers|layer|h|blocks))\.(\d+)/")


#: fused residual add + norm (the model builder's): output 3 is the residual stream, input + skip
SKIP_NORMS = ("SkipSimplifiedLayerNormalization", "SkipLayerNormalization")


def layer_output_tensors(graph) -> tuple[str, dict[int, str]]:
    """(ModuleList path, {layer index: name of the tensor the layer hands on}) of an exported graph.

    The tensor of layer i is the one produced last (in the graph's topological order) by a
    node named ``/…/layers.i/…`` and read by a node outside that layer or by a graph output:
    that is the residual stream, whereas tensors shared across layers (rotary cos/sin) are
    produced early. A graph with fused residual adds (:func:`_fused_residuals`) is read that way instead.
    """
    fused = _fused_residuals(graph)
    if fused is not None:
        return fused
    consumers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.name)
    graph_outputs = {o.name for o in graph.output}
    found: dict[int, str] = {}
    prefix = None
    for node in graph.node:
        match = LAYER_NODE.match(node.name)
        if not match:
            continue
        prefix = prefix or match.group(1)
        if match.group(1) != prefix:  # a second stack (e.g. a decoder after an encoder): first one only
            continue
        index = int(match.group(2))
        own = f"/{match.group(1)}.{index}/"
        for out in node.output:
            if out in graph_outputs or any(not c.startswith(own) for c in consumers.get(out, ())):
                found[index] = out
    if not found or prefix is None:
        raise PRoLoRAError("cannot find the transformer layers in the graph (node names like /model/layers.0/…)")
    return prefix.replace("/", "."), found


def _fused_residuals(graph) -> tuple[str, dict[int, str]] | None:
    """Layer outputs of a graph whose residual adds are fused into the next norm (the model builder's
    ``SkipSimplifiedLayerNormalization``: inputs residual, sublayer output, weight; output 3 their sum), else
    None. Layer i's output is the sum taken by the last such node that adds an output of layer i (its MLP's,
    read by layer i+1's input norm or the final norm); where that node does not output the sum (the final
    norm), ``graph`` is edited to name its output 3, so run it on a copy."""
    producer = {out: node.name for node in graph.node for out in node.output}
    found: dict[int, Any] = {}
    prefix = None
    for node in graph.node:
        if node.op_type not in SKIP_NORMS or len(node.input) < 2:
            continue
        match = LAYER_NODE.match(producer.get(node.input[1], ""))
        if match is None or (prefix is not None and match.group(1) != prefix):
            continue
        prefix = match.group(1)
        found[int(match.group(2))] = node  # in topological order: the last add of layer i wins
    if not found or prefix is None:
        return None
    names = {}
    for index, node in found.items():
        while len(node.output) < 4:
            node.output.append("")
        if not node.output[3]:
            node.output[3] = f"{node.name}/prolora_parity_residual"
        names[index] = node.output[3]
    return prefix.replace("/", "."), names


def _tensor_types(model) -> dict[str, int]:
    """Element types of intermediate tensors (a new graph output must declare the right one)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is best effort; the logits' type is the fallback
        return {}
    return {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}


@contextlib.contextmanager
def _session_with_outputs(onnx_path: Path, provider: str, names: list[str],
                          kernel: str = "auto", model=None) -> Iterator[Any]:
    """An ORT session on a temporary copy of the graph (``model``: that graph as read and edited, without
    its external weights) whose outputs also include ``names``.

    The copy lives in a temporary folder beside the folder's other files (:func:`_mirror`), so
    external-data weights resolve without being read into memory.
    """
    import onnx

    model = model if model is not None else _read_onnx(onnx_path)
    existing = {o.name for o in model.graph.output}
    types = _tensor_types(model)
    default = model.graph.output[0].type.tensor_type.elem_type
    for name in names:
        if name not in existing:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, types.get(name, default), None))
    with tempfile.TemporaryDirectory(prefix="prolora-parity-") as scratch:
        for item in onnx_path.parent.iterdir():
            if item != onnx_path:
                _mirror(item, Path(scratch) / item.name)
        target = Path(scratch) / onnx_path.name
        onnx.save(model, str(target))
        try:
            session = inference_session(target, provider, kernel=kernel)
        except Exception as err:  # ORT raises several types; the caller then just reports why not
            raise PRoLoRAError(f"ONNX Runtime cannot run the graph with extra outputs ({str(err)[:200]})") from None
        yield session


def _mirror(item: Path, target: Path) -> None:
    """``item`` at ``target`` without copying it where possible: a hard link (ONNX Runtime ≥ 1.2x refuses
    external data behind a symlink that leads out of the model's folder), a copy across file systems, a
    symlink for a folder."""
    if item.is_dir():
        os.symlink(item.absolute(), target)
        return
    try:
        os.link(item, target)
    except OSError:
        shutil.copyfile(item, target)


def _graph_feeds(session, inputs: dict[str, torch.Tensor], config=None) -> dict[str, Any]:
    """Feeds of one whole-prompt call of the raw graph: the tokenizer's inputs, positions, token types
    and an empty KV cache (:func:`empty_past`, ``config``: the model's)."""
    given = {k: v.numpy() for k, v in inputs.items()}
    seq = inputs["input_ids"].shape[1]
    given.setdefault("position_ids", torch.arange(seq).unsqueeze(0).numpy())
    given.setdefault("token_type_ids", torch.zeros_like(inputs["input_ids"]).numpy())
    full = {}
    for spec in session.get_inputs():
        if spec.name in given:
            full[spec.name] = given[spec.name]
        elif spec.name.startswith("past_key_values"):
            full[spec.name] = empty_past(spec, inputs["input_ids"].shape[0], config)
    return full


def _run_with_layer_outputs(onnx_path: Path, provider: str, inputs: dict[str, torch.Tensor],
                            kernel: str = "auto", config=None) -> tuple[str, dict[int, Any]]:
    """(ModuleList path, {layer index: its output}) from one run of the graph on ``inputs``."""
    model = _read_onnx(onnx_path)
    modules, tensors = layer_output_tensors(model.graph)
    names = list(tensors.values())
    with _session_with_outputs(onnx_path, provider, names, kernel, model) as session:
        values = session.run(names, _graph_feeds(session, inputs, config))
    return modules, dict(zip(tensors, values, strict=True))


def localize(reference, onnx_path: Path, provider: str, inputs: dict[str, torch.Tensor], noise: float,
             prompt_index: int, kernel: str = "auto") -> dict[str, Any]:
    """The first layer whose own output error jumps above what it received, on one prompt.

    A fixed bound on the residual stream names the wrong layer: a 1 % error in one shard of
    layer 17 of SmolLM2 moves that layer's output by only 1e-5 relative (the residual is
    large), and the error then grows smoothly to 1.7e-4 at layer 29. Rounding grows by
    ≤ 2.5× per layer, a bug by orders of magnitude at once, so the culprit is the first layer
    whose relative error exceeds ``JUMP`` × max(the previous layer's, ``noise``). When no
    layer jumps (e.g. a precision problem spread over all layers) the largest one is named.
    """
    modules, onnx_outs = _run_with_layer_outputs(onnx_path, provider, inputs, kernel, reference.config)
    try:
        layers = reference.get_submodule(modules)
    except AttributeError:
        return {"layer": None, "note": f"PyTorch model has no module '{modules}' to compare layers with"}
    captured: dict[int, torch.Tensor] = {}

    def hook(index: int) -> Callable:
        def save(_module, _args, output):
            captured[index] = (output[0] if isinstance(output, tuple) else output).detach()
        return save

    handles = [layers[i].register_forward_hook(hook(i)) for i in onnx_outs if i < len(layers)]
    try:
        with torch.no_grad():
            reference(**{k: v for k, v in inputs.items() if k != "position_ids"})
    finally:
        for handle in handles:
            handle.remove()
    per_layer = {i: compare(captured[i], torch.from_numpy(onnx_outs[i]).to(captured[i].dtype), False)["rel"]
                 for i in sorted(onnx_outs) if i in captured}
    result: dict[str, Any] = {"prompt": prompt_index, "noise": noise, "per_layer_rel": per_layer, "layer": None}
    received = 0.0
    for i, rel in per_layer.items():
        if not rel <= JUMP * max(received, noise):  # NaN diverges too
            result.update(layer=i, module=f"{modules}.{i}", rel=rel, jump=rel / max(received, noise),
                          criterion="jump")
            return result
        received = rel
    if per_layer and max(per_layer.values()) > noise:
        i = max(per_layer, key=per_layer.__getitem__)
        result.update(layer=i, module=f"{modules}.{i}", rel=per_layer[i], jump=None, criterion="largest")
    else:
        result["note"] = "every layer output matches to rounding; the difference is after the last layer (norm/head)"
    return result


# ---------------------------------------------------------------------- adapter isolation

ADAPTER_DOMAIN = "ai.prolora"



def adapter_nodes(graph) -> list:
    """The compact graph's adapter op nodes (empty for a merged export)."""
    return [n for n in graph.node if n.domain == ADAPTER_DOMAIN]


class AdapterIsolation:
    """The adapter checked apart from the base, so a wrong adapter fails even when the base is approximate
    (a quantized base moves every logit by percents, which hides a shard that is 2 % off).

    * effect: logits(graph) − logits(same graph, zero adapter) against PyTorch's
      (base + adapter) − base, relative error ``‖Δeffect‖/‖effect‖``. The zero adapter is fed as
      zero B tensors (graph inputs of a compact export), so base error cancels to first order; what
      is left is the quantized base's different hidden states, which the bound allows for.
    * op: each ``ai.prolora`` node's output against the PyTorch layer's ``adapter_output`` of the
      very input the graph fed that node (taken out as an extra graph output), worst relative error
      over nodes: independent of the base's error altogether, so its bound is fp32 rounding.
    """

    def __init__(self, reference, onnx_path: Path, provider: str, output_name: str, kernel: str = "auto"):
        graph = _read_onnx(onnx_path).graph
        self.reference, self.output_name = reference, output_name
        self.nodes = [(n.input[0], n.output[0], n.input[1].rsplit(".", 1)[0]) for n in adapter_nodes(graph)]
        overridable = {i.name for i in graph.initializer} & {i.name for i in graph.input}
        dims = {i.name: (tuple(i.dims), i.data_type) for i in graph.initializer}
        names = {name for n in adapter_nodes(graph) for name in n.input[1:] if name}
        b_names = sorted(n for n in names if n.rsplit(".", 1)[-1] in B_TENSORS)
        if not b_names or not set(b_names) <= overridable:
            raise PRoLoRAError("the adapter's B tensors are not graph inputs, so the zero adapter cannot be fed")
        import numpy as np
        import onnx

        self.zero_feeds = {n: np.zeros(dims[n][0], dtype=onnx.helper.tensor_dtype_to_np_dtype(dims[n][1]))
                           for n in b_names}
        self._stack = contextlib.ExitStack()
        extra = [name for x, out, _ in self.nodes for name in (x, out)]
        self.session = self._stack.enter_context(_session_with_outputs(onnx_path, provider, extra, kernel))

    def close(self) -> None:
        self._stack.close()

    def measure(self, inputs: dict[str, torch.Tensor], ref_with: torch.Tensor) -> dict[str, float]:
        """``effect_rel`` and ``op_rel`` of one prompt; ``ref_with`` is PyTorch's base + adapter output."""
        feeds = _graph_feeds(self.session, inputs, self.reference.config)
        extra = [name for x, out, _ in self.nodes for name in (x, out)]
        values = self.session.run([self.output_name, *extra], feeds)
        zero = self.session.run([self.output_name], {**feeds, **self.zero_feeds})[0]
        with torch.no_grad(), _zero_adapter(self.reference):
            ref_base = getattr(self.reference(**inputs), self.output_name)
        effect = torch.from_numpy(values[0]).double() - torch.from_numpy(zero).double()
        effect_rel = compare(ref_with.double() - ref_base.double(), effect, False)["rel"]
        worst = 0.0
        for i, (_, _, module) in enumerate(self.nodes):
            x, out = values[1 + 2 * i], values[2 + 2 * i]
            layer = self.reference.get_submodule(module)
            with torch.no_grad():
                want = layer.adapter_output(torch.from_numpy(x).to(next(layer.parameters()).dtype))
            worst = _worst([worst, compare(want, torch.from_numpy(out).to(want.dtype), False)["rel"]], "max")
        return {"effect_rel": effect_rel, "op_rel": worst}


def judged_kernels(provider: str, kernel: str, graph) -> list[str]:
    """The implementations of the adapter op a parity run judges (KERNEL_USERS), the one that ships first.

    ``auto``: the function body, which every runtime but ours executes, and the native kernel too where it is
    built (CPU) and the graph has an op it implements; ``function`` or ``native``: that one alone (native runs
    the body on a graph without such an op); a merged graph: ``none``."""
    nodes = adapter_nodes(graph)
    if not nodes:
        return ["none"]
    native = kernel_library(provider, kernel) is not None and any(n.op_type in NATIVE_OPS for n in nodes)
    if kernel == "auto":
        return ["function", "native"] if native else ["function"]
    return ["native" if native else "function"]
