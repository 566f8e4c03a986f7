"""The parity reference of a quantized graph: PyTorch base + adapter, quantized the way the graph says.

Compared with the float model, a quantized graph is off by percents (int8) to tens of percents (int4) of the
logits, which is as much as a whole adapter moves them: against a float reference no bound can tell a faithful
int4 export from one that lost its adapter, and a merged graph has no adapter op to check apart. So the
reference is quantized the same way, by an implementation of our own (float64, torch), never by reading the
graph's weights back: every weight that the graph quantizes (one ``com.microsoft::MatMulNBits`` or
``GatherBlockQuantized`` node, named by optimum after its module) is replaced by the round trip of the RTN
block quantization ONNX Runtime's ``MatMulNBitsQuantizer`` applies (``onnx/quantize.py``: asymmetric, blocks
of ``block_size`` along K, ``bits`` from the node): per block, ``lo = min(w, 0)``, ``hi = max(w, 0)``,
``scale = (hi − lo) / (2^bits − 1)``, ``zp = round(−lo / scale)``, ``q = clip(round(w / scale + zp))``, in
float32 with the quantizer's own rounding (:func:`rtn_roundtrip`).

* Merged graph: a PRoLoRA layer's weight is ``W + ΔW`` before quantization, ΔW taken from the unmerged
  layer's own forward (``adapter_output`` of the identity), so a graph that lost its adapter, which quantized
  ``W`` instead, is off by the adapter's whole effect.
* Compact graph: the base layer's weight ``W`` is quantized; the adapter stays float, as in the graph.
* ``accuracy_level`` 4 on the CPU: ONNX Runtime quantizes each MatMulNBits input to int8 in blocks of
  ``block_size`` (symmetric, ``round(x · 127 / max|x|)``), which a forward pre-hook repeats.

What is left is float rounding and rare rounding ties (a value that lands exactly between two codes in one
implementation and not the other): the tiny test Llama, whose embeddings sit on the 4-bit grid, gives logits
rel ≤ 1e-2, against 0.17 for the float reference; a lost adapter gives 0.7 there.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import PRoLoRAError
from ..layer import PRoLoRALinear, stores_transposed
from ..onnx.quantize import RECORD_KEY

QUANTIZED_NODES = ("MatMulNBits", "GatherBlockQuantized")
#: MatMulNBits ``accuracy_level`` whose CPU kernel quantizes the activations to int8 blocks
INT8_ACTIVATIONS = 4


@dataclass
class QuantizedReference:
    """What was quantized in the reference, for the report."""

    method: str = "rtn"
    bits: list[int] = field(default_factory=list)
    block_sizes: list[int] = field(default_factory=list)
    matmuls: int = 0
    embeddings: int = 0
    merged_adapter_layers: int = 0
    int8_activations: bool = False
    note: str = ""

    def describe(self) -> str:
        bits = "/".join(f"int{b}" for b in self.bits)
        text = (f"{bits} RTN weights as the graph's ({self.matmuls} MatMul, {self.embeddings} embedding; blocks of "
                f"{'/'.join(map(str, self.block_sizes))})")
        if self.merged_adapter_layers:
            text += f", W + ΔW quantized in {self.merged_adapter_layers} adapter layers"
        if self.int8_activations:
            text += ", int8 activation blocks"
        return text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's ``roundf``: ties away from zero (``torch.round`` rounds them to even)."""
    whole = torch.trunc(x)
    return torch.where((x - whole).abs() == 0.5, whole + torch.sign(x), torch.round(x))


def rtn_roundtrip(weight: torch.Tensor, bits: int, block_size: int, gather: bool = False) -> torch.Tensor:
    """``weight`` (K, N), each column quantized in blocks of ``block_size`` rows (asymmetric RTN, ``bits``) and
    dequantized (float64). The arithmetic is the quantizer's own, in float32, so that values on a coarse grid
    (bf16 checkpoints) meet the same rounding ties: MatMul weights as ORT's C++ ``quantize_matmul_*bits``
    (``roundf``, multiply by the reciprocal scale), embeddings (``gather``) as its numpy ``quantize_ndarray``
    (round half to even, divide by the scale; an all-zero block gets zero point 8). The last block is padded
    with zeros, as the quantizer pads it."""
    k, n = weight.shape
    blocks = -(-k // block_size)
    w = nn.functional.pad(weight.float(), (0, 0, 0, blocks * block_size - k)).reshape(blocks, block_size, n)
    levels = 2**bits - 1
    lo, hi = w.amin(1, keepdim=True).clamp_max(0), w.amax(1, keepdim=True).clamp_min(0)
    scale = (hi - lo).div(torch.full_like(hi, levels))  # a true division (``/ int`` may use a reciprocal)
    flat = scale == 0
    safe = torch.where(flat, torch.ones_like(scale), scale)
    if gather:
        zero = torch.where(flat, 8.0, torch.round(-lo.div(safe))).clamp(0, levels)
        codes = torch.where(flat, 8.0, torch.round(w.div(safe) + zero)).clamp(0, levels)
    else:
        zero = torch.where(flat, 0.0, _round_half_away(torch.zeros_like(lo) - lo.div(safe))).clamp(0, levels)
        reciprocal = torch.where(flat, 0.0, torch.ones_like(scale).div(safe))
        codes = _round_half_away(w * reciprocal + zero).clamp(0, levels)
    return ((codes.double() - zero.double()) * scale.double()).reshape(blocks * block_size, n)[:k]


def int8_activation_hook(block_size: int) -> Callable:
    """A forward pre-hook: the input quantized to int8 in blocks of ``block_size`` along its last axis and
    dequantized (symmetric, ``round(x · 127 / max|x|)`` in float32), what MatMulNBits does at accuracy level 4."""

    def hook(_module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        k = x.shape[-1]
        blocks = -(-k // block_size)
        xp = nn.functional.pad(x.float(), (0, blocks * block_size - k)).reshape(*x.shape[:-1], blocks, block_size)
        amax = xp.abs().amax(-1, keepdim=True)
        # true float32 divisions (``127 / tensor`` would multiply by a rounded reciprocal): ties round as ORT's
        inverse = torch.where(amax == 0, 0.0, torch.full_like(amax, 127).div(torch.where(amax == 0, 1.0, amax)))
        scale = amax.div(torch.full_like(amax, 127))
        out = (torch.round(xp * inverse).double() * scale.double()).reshape(*x.shape[:-1], -1)[..., :k]
        return (out.to(x.dtype), *args[1:])

    return hook


def _attributes(node) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def module_path(node) -> str:
    """``/model/layers.0/self_attn/q_proj/MatMul_Q4`` -> ``model.layers.0.self_attn.q_proj`` (optimum names a
    node after the module that made it; the quantizer keeps that name with a suffix)."""
    if not node.name.startswith("/") or node.name.count("/") < 2:
        raise PRoLoRAError(f"cannot tell which module the quantized node {node.name or node.op_type!r} belongs to "
                           "(expected an optimum node name like /model/layers.0/mlp/up_proj/MatMul_Q4)")
    return node.name[1:].rsplit("/", 1)[0].replace("/", ".")


def _check_record(model_proto) -> str:
    """A note when the graph has no record of its quantization (RTN is then assumed); refuses another method."""
    meta = {p.key: p.value for p in model_proto.metadata_props}
    if RECORD_KEY not in meta:
        return f"RTN assumed: the graph has no {RECORD_KEY} record"
    try:
        record = json.loads(meta[RECORD_KEY])
    except json.JSONDecodeError:
        raise PRoLoRAError(f"the graph's {RECORD_KEY} metadata is not JSON") from None
    if record.get("method") != "rtn" or record.get("symmetric"):
        raise PRoLoRAError(f"the graph was quantized with {record.get('method')!r} (symmetric: "
                           f"{record.get('symmetric')}); parity reproduces only asymmetric RTN, what "
                           "`prolora-export quantize` writes")
    return ""


def _base_weight_owner(module: nn.Module, path: str, merged: bool) -> tuple[nn.Module, PRoLoRALinear | None]:
    """The layer holding the quantized weight, and the PRoLoRA layer whose ΔW joins it (merged graphs)."""
    if isinstance(module, PRoLoRALinear):
        if not merged:
            raise PRoLoRAError(f"the compact graph quantized the adapter layer {path} itself, not its base layer")
        return module.base_layer, module
    if not isinstance(getattr(module, "weight", None), torch.Tensor):
        raise PRoLoRAError(f"quantized node of {path}: that module has no weight to quantize")
    return module, None


def quantize_reference(model: nn.Module, model_proto, merged: bool, provider: str = "cpu") -> QuantizedReference:
    """Replace, in place, every weight of ``model`` that ``model_proto`` (read without its weights) quantizes by
    its RTN round trip (module doc); returns what was done. A node that maps to no module of the right shape
    is one clear error: a reference that is not the graph's scheme would judge nothing."""
    summary = QuantizedReference()
    summary.note = _check_record(model_proto)
    if any(n.op_type == "MatMulInteger" for n in model_proto.graph.node):
        raise PRoLoRAError("a MatMulInteger graph (quantize_dynamic, an earlier version) quantizes activations per "
                           "call, which no reference reproduces: quantize the fp32 export again")
    planned: list[tuple[nn.Module, torch.Tensor, PRoLoRALinear | None, dict[str, Any], str]] = []
    for node in model_proto.graph.node:
        if node.op_type not in QUANTIZED_NODES or node.domain != "com.microsoft":
            continue
        attrs, path = _attributes(node), module_path(node)
        if len(node.input) < 4 or not node.input[3]:
            raise PRoLoRAError(f"{node.name}: symmetric quantization (no zero points); parity reproduces only the "
                               "asymmetric RTN that `prolora-export quantize` writes")
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise PRoLoRAError(f"the quantized node {node.name} names a module {path} the PyTorch model does not "
                               "have") from None
        owner, prolora = _base_weight_owner(module, path, merged) if node.op_type == "MatMulNBits" else (module, None)
        planned.append((owner, owner.weight.detach(), prolora, attrs | {"op": node.op_type}, path))
    for owner, weight, prolora, attrs, path in planned:  # originals read first: tied weights stay apart
        bits, block = attrs.get("bits", 4), attrs["block_size"]
        if attrs["op"] == "GatherBlockQuantized":
            axis = attrs.get("quantize_axis", 1)
            table = weight.double() if axis == 0 else weight.double().t()
            new = rtn_roundtrip(table, bits, block, gather=True)
            new = new if axis == 0 else new.t()
            summary.embeddings += 1
        else:
            w = weight.double() if stores_transposed(owner) else weight.double().t()  # (K, N)
            if tuple(w.shape) != (attrs["K"], attrs["N"]):
                raise PRoLoRAError(f"the quantized node of {path} is {attrs['K']}×{attrs['N']}, the PyTorch layer "
                                   f"{w.shape[0]}×{w.shape[1]}")
            if prolora is not None:
                with torch.no_grad():
                    eye = torch.eye(w.shape[0], dtype=weight.dtype, device=weight.device)
                    w = w + prolora.adapter_output(eye).double()
                prolora.merged = True  # ΔW is in the base weight now, as in the graph
                summary.merged_adapter_layers += 1
            new = rtn_roundtrip(w, bits, block)
            new = new if stores_transposed(owner) else new.t()
            if provider == "cpu" and attrs.get("accuracy_level") == INT8_ACTIVATIONS:
                owner.register_forward_pre_hook(int8_activation_hook(block))
                summary.int8_activations = True
            summary.matmuls += 1
        owner.weight = nn.Parameter(new.to(weight.dtype).contiguous(), requires_grad=False)
        summary.bits = sorted({*summary.bits, bits})
        summary.block_sizes = sorted({*summary.block_sizes, block})
    if not planned:
        raise PRoLoRAError("the graph has no MatMulNBits or GatherBlockQuantized node to reproduce")
    return summary


__all__ = ["QuantizedReference", "int8_activation_hook", "quantize_reference", "rtn_roundtrip"]
