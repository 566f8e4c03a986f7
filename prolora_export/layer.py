"""``PRoLoRALinear``: a frozen base linear layer plus a PRoLoRA adapter.

Holds the four trainable tensors of SPEC §1 under their SPEC names, so a module at
path P exposes ``P.prolora_A_shard`` etc. in ``state_dict()`` exactly like the
adapter file. All math is delegated to :mod:`prolora_export.shards`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import PRoLoRAConfig
from .errors import PRoLoRAError
from .shards import TENSOR_NAMES, ShardGeometry, compact_forward, delta_weight, stacked_shards

SUPPORTED_LAYERS = (nn.Linear, Conv1D)


def layer_features(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a supported base layer. GPT-2's Conv1D stores W transposed."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.nf
    raise PRoLoRAError(f"{type(layer).__name__} is not supported (expected torch.nn.Linear or transformers Conv1D)")


def stores_transposed(layer: nn.Module) -> bool:
    """True when the layer keeps its weight as (d_in, d_out), transformers' Conv1D (GPT-2 style),
    rather than nn.Linear's (d_out, d_in). Decided by the layer's type, never by the weight's
    shape: a square weight has both shapes."""
    return isinstance(layer, Conv1D)


class PRoLoRALinear(nn.Module):
    """``y = base(x) + γ·(dropout(x) Aᵀ) Bᵀ`` with A and B never materialised."""

    def __init__(self, base_layer: nn.Module, config: PRoLoRAConfig):
        super().__init__()
        d_in, d_out = layer_features(base_layer)
        self.base_layer = base_layer
        self.geometry: ShardGeometry = config.geometry(d_in, d_out)
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.merged = False
        #: inference cache of the stacked shards and the (pointer, version, dtype) it was made from
        self._stacks: tuple[torch.Tensor, torch.Tensor] | None = None
        self._stacks_key: tuple | None = None
        weight = base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        for name, shape in self.geometry.tensor_shapes().items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=dtype, device=weight.device)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Rectified init: A ~ U(±1/√d_in) with the FULL d_in as fan-in; B = 0 (starts as the base)."""
        bound = 1.0 / math.sqrt(self.geometry.in_features)
        with torch.no_grad():
            for name, tensor in self.adapter_tensors().items():
                if "_A_" in name:
                    tensor.uniform_(-bound, bound)
                else:
                    tensor.zero_()

    def adapter_tensors(self) -> dict[str, nn.Parameter]:
        """The present trainable tensors by SPEC suffix (a pair is absent when u = 0 or u = r)."""
        return {name: getattr(self, name) for name in TENSOR_NAMES if hasattr(self, name)}

    def _factors(self) -> tuple[torch.Tensor | None, ...]:
        # straight from the parameter dict: nn.Module.__getattr__ costs µs per call, which shows when decoding
        return tuple(self._parameters.get(name) for name in TENSOR_NAMES)

    def _inference_stacks(self, factors: tuple[torch.Tensor | None, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Stacked shards (:func:`shards.stacked_shards`) kept while no gradient is taken and the
        shards are unchanged, so decoding skips re-stacking them every token; None when training
        (then autograd must see the stacking) or when there is nothing to stack."""
        if self.geometry.shared_r == 0 or (
            torch.is_grad_enabled() and any(t.requires_grad for t in factors if t is not None)
        ):
            return None
        key = tuple((t.data_ptr(), t._version, t.dtype) for t in factors if t is not None)
        if self._stacks_key != key:
            self._stacks = stacked_shards(self.geometry, *factors)
            self._stacks_key = key
        return self._stacks

    def adapter_output(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution for (already dropped-out) input x; the ONNX exporter swaps this."""
        factors = self._factors()
        adapter_dtype = (factors[0] if factors[0] is not None else factors[2]).dtype
        xa = x if x.dtype == adapter_dtype else x.to(adapter_dtype)
        out = compact_forward(self.geometry, self.scaling, xa, *factors, stacks=self._inference_stacks(factors))
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        dropped = x if isinstance(self.dropout, nn.Identity) else self.dropout(x)  # skip a no-op module call
        return result + self.adapter_output(dropped)

    def delta_weight(self) -> torch.Tensor:
        """ΔW in fp32, shaped like the base weight (transposed for Conv1D)."""
        delta = delta_weight(self.geometry, self.scaling, *self._factors())
        return delta.t() if stores_transposed(self.base_layer) else delta

    @torch.no_grad()
    def merge(self) -> None:
        """Add ΔW into the base weight in place (computed in fp32, cast to the weight's dtype)."""
        if not self.merged:
            weight = self.base_layer.weight
            weight.copy_((weight.float() + self.delta_weight().to(weight.device)).to(weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ΔW again; fp32 weights come back within rounding (≤ 1e-6 relative)."""
        if self.merged:
            weight = self.base_layer.weight
            weight.copy_((weight.float() - self.delta_weight().to(weight.device)).to(weight.dtype))
            self.merged = False

    def num_trainable_parameters(self) -> int:
        return self.geometry.num_parameters

    def extra_repr(self) -> str:
        g = self.geometry
        return (
            f"in={g.in_features}, out={g.out_features}, r={g.r}, u={g.unshared_r}, "
            f"m={g.sharing_rate_a}, n={g.sharing_rate_b}, s_A={g.stride_a}, s_B={g.stride_b}"
        )
