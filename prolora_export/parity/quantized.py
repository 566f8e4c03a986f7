"""The parity reference of a quantized graph: PyTorch base + adapter, quantized the way the graph says.

Compared with the float model, a quantized graph is off by percents (int8) to tens of percents (int4) of the
logits, which is as much as a whole adapter moves them: against a float reference no bound can tell a faithful
int4 export from one that lost its adapter, and a merged graph has no adapter op to check apart. So the
reference is quantized the same way, by an implementation of our own (float64, torch), never by reading the
graph's weights back: every weight that the graph quantizes (one ``com.microsoft::MatMulNBits`` or
``GatherBlockQuantized`` node, named after its module) is replaced by the round trip of the RTN block
quantization ONNX Runtime's ``MatMulNBitsQuantizer`` applies, with ``bits`` and ``block_size`` (along K) read
from the node, in float32 with the quantizer's own rounding (:func:`rtn_roundtrip`):

* asymmetric (zero points in the graph: ``prolora-export quantize``, ``onnx/quantize.py``): per block,
  ``lo = min(w, 0)``, ``hi = max(w, 0)``, ``scale = (hi − lo) / (2^bits − 1)``, ``zp = round(−lo / scale)``,
  ``q = clip(round(w / scale + zp))``;
* symmetric (no zero points: the default of ONNX Runtime GenAI's model builder, ``onnx --graph builder
  --quantize``): ``scale = peak / −2^(bits−1)`` with ``peak`` the block's value of largest magnitude,
  ``q = clip(round(w / scale) + 2^(bits−1))``.

Node names: optimum's are the module's (``/model/layers.0/self_attn/q_proj/MatMul_Q4``); the model builder's
say ``attn`` for ``self_attn``, ``/lm_head/MatMul_Q4`` for the head, and its merged graphs pack Q/K/V into one
``…/attn/qkv_proj/MatMul_Q4`` (and gate/up where it fuses them) by concatenating the weights along N. Each
column is quantized on its own (blocks run along K), so the packed node's round trip is each module's round
trip side by side: the reference quantizes q, k and v (W + ΔW each) apart and checks that their N add up.

* Merged graph: a PRoLoRA layer's weight is ``W + ΔW`` before quantization, ΔW taken from the unmerged
  layer's own forward (``adapter_output`` of the identity), so a graph that lost its adapter, which quantized
  ``W`` instead, is off by the adapter's whole effect.
* Compact graph: the base layer's weight ``W`` is quantized; the adapter stays float, as in the graph.
* ``accuracy_level`` 4 on the CPU: ONNX Runtime quantizes each MatMulNBits input to int8 in blocks of
  ``block_size`` (symmetric, ``round(x · 127 / max|x|)``), which a forward pre-hook repeats.

What is left is float rounding and rare rounding ties (a value that lands exactly between two codes in one
implementation and not the other): the tiny test Llama, whose embeddings sit on the 4-bit grid, gives logits
rel ≤ 1e-2, against 0.17 for the float reference; a lost adapter gives 0.7 there. Builder graphs of a tiny
Llama (tests/test_parity_builder_quantized.py), int4 and int8, merged and compact: faithful rel ≈ 3e-7 (the
float reference: 0.13–0.15 at int4, 0.01–0.02 at int8; without the int8 activation blocks: 9e-3), a lost
adapter 1.2, B × 0.5 ≥ 0.52. A tiny OLMo's int4 compact graph: 5.4e-3, all of it the int8 activation blocks
after its LayerNorms (ORT's and torch's normalized values differ in the last bits, and some int8 codes flip):
at accuracy level 0 it is 3.2e-7; B × 0.5 gives 0.56.
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
from ..onnx.graph.builder import BLOCKS
from ..onnx.quantize import RECORD_KEY

QUANTIZED_NODES = ("MatMulNBits", "GatherBlockQuantized")
#: the model builder's packed projections (merged graphs) and the Hugging Face modules they concatenate along N
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
#: MatMulNBits ``accuracy_level`` whose CPU kernel quantizes the activations to int8 blocks
INT8_ACTIVATIONS = 4


@dataclass
class QuantizedReference:
    """What was quantized in the reference, for the report."""

    method: str = "rtn"
    bits: list[int] = field(default_factory=list)
    block_sizes: list[int] = field(default_factory=list)
    #: "symmetric" (no zero points: the model builder's) and/or "asymmetric" (``prolora-export quantize``'s)
    kinds: list[str] = field(default_factory=list)
    matmuls: int = 0
    #: MatMul nodes holding several modules' weights (the model builder's qkv_proj, gate_up_proj)
    packed: int = 0
    embeddings: int = 0
    merged_adapter_layers: int = 0
    int8_activations: bool = False
    note: str = ""

    def describe(self) -> str:
        bits = "/".join(f"int{b}" for b in self.bits)
        packed = f", {self.packed} packed" if self.packed else ""
        text = (f"{bits} RTN weights as the graph's ({' and '.join(self.kinds)}; {self.matmuls} MatMul{packed}, "
                f"{self.embeddings} embedding; blocks of {'/'.join(map(str, self.block_sizes))})")
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


def rtn_roundtrip(weight: torch.Tensor, bits: int, block_size: int, gather: bool = False,
                  symmetric: bool = False) -> torch.Tensor:
    """``weight`` (K, N), each column quantized in blocks of ``block_size`` rows (RTN, ``bits``) and
    dequantized (float64). The arithmetic is the quantizer's own, in float32, so that values on a coarse grid
    (bf16 checkpoints) meet the same rounding ties: MatMul weights as ORT's C++ ``quantize_matmul_*bits``
    (``roundf``, multiply by the reciprocal scale), embeddings (``gather``) as its numpy ``quantize_ndarray``
    (round half to even, divide by the scale; an all-zero block gets zero point 8). The last block is padded
    with zeros, as the quantizer pads it. ``symmetric`` (MatMul weights, the model builder's default): zero
    point ``2^(bits−1)`` and a signed scale ``peak / −2^(bits−1)``, ``peak`` the block's value of largest
    magnitude (the negative one on a tie), so ``peak`` itself gets code 0 and the other side clips at the top."""
    k, n = weight.shape
    blocks = -(-k // block_size)
    w = nn.functional.pad(weight.float(), (0, 0, 0, blocks * block_size - k)).reshape(blocks, block_size, n)
    levels = 2**bits - 1
    lo, hi = w.amin(1, keepdim=True).clamp_max(0), w.amax(1, keepdim=True).clamp_min(0)
    if symmetric:
        peak = torch.where(hi.abs() > lo.abs(), hi, lo)
        scale = peak.div(torch.full_like(peak, -(2 ** (bits - 1))))
    else:
        scale = (hi - lo).div(torch.full_like(hi, levels))  # a true division (``/ int`` may use a reciprocal)
    flat = scale == 0
    safe = torch.where(flat, torch.ones_like(scale), scale)
    if symmetric:
        zero = torch.full_like(scale, 2 ** (bits - 1))
        reciprocal = torch.where(flat, 0.0, torch.ones_like(scale).div(safe))
        codes = _round_half_away(w * reciprocal + zero).clamp(0, levels)
    elif gather:
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
                           "(expected a node name like /model/layers.0/mlp/up_proj/MatMul_Q4)")
    return node.name[1:].rsplit("/", 1)[0].replace("/", ".")


def quantized_modules(node, model: nn.Module, builder: bool) -> list[str]:
    """The modules whose weights one quantized node holds, in the order its N columns pack them: the module
    its name gives (:func:`module_path`), or for the model builder's names (``attn`` for ``self_attn``) its
    packed ``qkv_proj``/``gate_up_proj`` where the model has q/k/v (gate/up) apart."""
    path = module_path(node)
    if builder:
        hf_blocks = {ours: theirs for theirs, ours in BLOCKS.items()}
        path = ".".join(hf_blocks.get(part, part) for part in path.split("."))
        stem, _, name = path.rpartition(".")
        members = [f"{stem}.{m}" for m in PACKED.get(name, ())]
        if members and not _has_module(model, path) and all(_has_module(model, m) for m in members):
            return members
    if not _has_module(model, path):
        raise PRoLoRAError(f"the quantized node {node.name} names a module {path} the PyTorch model does not have")
    return [path]


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _check_record(model_proto, builder: bool) -> str:
    """A note when the graph has no record of its quantization (RTN is then assumed: the model builder's
    default, ``prolora-export quantize``'s only method); refuses another method."""
    meta = {p.key: p.value for p in model_proto.metadata_props}
    if RECORD_KEY not in meta:
        return ("the model builder's default RTN assumed" if builder
                else f"RTN assumed: the graph has no {RECORD_KEY} record")
    try:
        record = json.loads(meta[RECORD_KEY])
    except json.JSONDecodeError:
        raise PRoLoRAError(f"the graph's {RECORD_KEY} metadata is not JSON") from None
    if record.get("method") != "rtn":
        raise PRoLoRAError(f"the graph was quantized with {record.get('method')!r}; parity reproduces only RTN, "
                           "what `prolora-export quantize` and the model builder write")
    return ""


def _base_weight_owner(module: nn.Module, path: str, merged: bool,
                       builder: bool) -> tuple[nn.Module, PRoLoRALinear | None]:
    """The layer holding the quantized weight, and the PRoLoRA layer whose ΔW joins it (merged graphs). In a
    compact graph optimum names the base layer's node ``…/q_proj/base_layer/…``; the model builder names the
    projection, which the splice left as the base's (the adapter op sits beside it)."""
    if isinstance(module, PRoLoRALinear):
        if not (merged or builder):
            raise PRoLoRAError(f"the compact graph quantized the adapter layer {path} itself, not its base layer")
        return module.base_layer, module if merged else None
    if not isinstance(getattr(module, "weight", None), torch.Tensor):
        raise PRoLoRAError(f"quantized node of {path}: that module has no weight to quantize")
    return module, None


def _kn(owner: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """A linear layer's weight as MatMulNBits reads it: (K in, N out)."""
    return weight if stores_transposed(owner) else weight.t()


def _check_sizes(node, attrs: dict[str, Any], members: list[str], owners: list[nn.Module]) -> None:
    """The node is K×N and its modules (several: packed along N) each K×Nᵢ with ΣNᵢ = N."""
    shapes = [tuple(_kn(owner, owner.weight).shape) for owner in owners]
    if {k for k, _ in shapes} != {attrs["K"]} or sum(n for _, n in shapes) != attrs["N"]:
        found = " + ".join(f"{k}×{n}" for k, n in shapes)
        raise PRoLoRAError(f"the quantized node {node.name} is {attrs['K']}×{attrs['N']}, the PyTorch "
                           f"{'layers' if len(members) > 1 else 'layer'} {', '.join(members)} {found}")


def quantize_reference(model: nn.Module, model_proto, merged: bool, provider: str = "cpu",
                       builder: bool = False) -> QuantizedReference:
    """Replace, in place, every weight of ``model`` that ``model_proto`` (read without its weights) quantizes by
    its RTN round trip (module doc); returns what was done. ``builder``: the model builder wrote the graph (its
    node names, :func:`quantized_modules`). A node that maps to no module of the right shape is one clear
    error: a reference that is not the graph's scheme would judge nothing."""
    summary = QuantizedReference()
    summary.note = _check_record(model_proto, builder)
    if any(n.op_type == "MatMulInteger" for n in model_proto.graph.node):
        raise PRoLoRAError("a MatMulInteger graph (quantize_dynamic, an earlier version) quantizes activations per "
                           "call, which no reference reproduces: quantize the fp32 export again")
    planned: list[tuple[nn.Module, torch.Tensor, PRoLoRALinear | None, dict[str, Any]]] = []
    for node in model_proto.graph.node:
        if node.op_type not in QUANTIZED_NODES or node.domain != "com.microsoft":
            continue
        attrs = _attributes(node) | {"op": node.op_type, "symmetric": len(node.input) < 4 or not node.input[3]}
        if attrs["symmetric"] and node.op_type == "GatherBlockQuantized":
            raise PRoLoRAError(f"{node.name}: a symmetric quantized embedding (no zero points), which parity does "
                               "not reproduce")
        members = quantized_modules(node, model, builder)
        owners = [_base_weight_owner(model.get_submodule(path), path, merged, builder) if node.op_type == "MatMulNBits"
                  else (model.get_submodule(path), None) for path in members]
        if node.op_type == "MatMulNBits":
            _check_sizes(node, attrs, members, [owner for owner, _ in owners])
            summary.matmuls += 1
            summary.packed += len(members) > 1
        else:
            summary.embeddings += 1
        summary.kinds = sorted({*summary.kinds, "symmetric" if attrs["symmetric"] else "asymmetric"})
        planned += [(owner, owner.weight.detach(), prolora, attrs) for owner, prolora in owners]
    for owner, weight, prolora, attrs in planned:  # originals read first: tied weights stay apart
        bits, block = attrs.get("bits", 4), attrs["block_size"]
        if attrs["op"] == "GatherBlockQuantized":
            axis = attrs.get("quantize_axis", 1)
            table = weight.double() if axis == 0 else weight.double().t()
            new = rtn_roundtrip(table, bits, block, gather=True)
            new = new if axis == 0 else new.t()
        else:
            w = _kn(owner, weight.double())
            if prolora is not None:
                with torch.no_grad():
                    eye = torch.eye(w.shape[0], dtype=weight.dtype, device=weight.device)
                    w = w + prolora.adapter_output(eye).double()
                prolora.merged = True  # ΔW is in the base weight now, as in the graph
                summary.merged_adapter_layers += 1
            new = rtn_roundtrip(w, bits, block, symmetric=attrs["symmetric"])
            new = new if stores_transposed(owner) else new.t()
            if provider == "cpu" and attrs.get("accuracy_level") == INT8_ACTIVATIONS:
                owner.register_forward_pre_hook(int8_activation_hook(block))
                summary.int8_activations = True
        owner.weight = nn.Parameter(new.to(weight.dtype).contiguous(), requires_grad=False)
        summary.bits = sorted({*summary.bits, bits})
        summary.block_sizes = sorted({*summary.block_sizes, block})
    if not planned:
        raise PRoLoRAError("the graph has no MatMulNBits or GatherBlockQuantized node to reproduce")
    return summary


__all__ = ["QuantizedReference", "int8_activation_hook", "quantize_reference", "rtn_roundtrip"]
