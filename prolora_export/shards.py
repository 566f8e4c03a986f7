"""The PRoLoRA math of SPEC §1 and nothing else: shapes, strides, reconstruction,
the delta weight and the compact forward. Pure torch functions, no I/O.

Every other part of the package (the layer, merging, conversion, ONNX export,
parity) calls these functions, so there is exactly one implementation of the math.

Conventions: A₀ = ``a_shard`` (r_s × c_A), B₀ = ``b_shard`` (c_B × r_s),
A_u = ``a_unshared`` (u × d_in), B_u = ``b_unshared`` (d_out × u). A missing
shared or unshared pair is passed as ``None``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def chunk_width(features: int, sharing_rate: int) -> int:
    """Width of one chunk when ``features`` are cut into ``sharing_rate`` chunks (last one truncated)."""
    return math.ceil(features / sharing_rate)


def default_stride(shared_r: int, sharing_rate: int) -> int:
    """SPEC default base stride: ``max(floor(r_s / m), 1)``."""
    return max(shared_r // sharing_rate, 1)


@dataclass(frozen=True)
class ShardGeometry:
    """Everything about one adapted layer that is fixed by the hyperparameters and its shape.

    ``stride_a`` / ``stride_b`` are the *effective* strides: 0 when rotation is off.
    """

    in_features: int
    out_features: int
    r: int
    unshared_r: int
    sharing_rate_a: int
    sharing_rate_b: int
    stride_a: int
    stride_b: int

    @classmethod
    def build(
        cls,
        in_features: int,
        out_features: int,
        r: int,
        unshared_r: int,
        sharing_rate_a: int,
        sharing_rate_b: int,
        rotate: bool = True,
        stride_a: int | None = None,
        stride_b: int | None = None,
    ) -> ShardGeometry:
        """Resolve default strides and the rotation switch into effective strides."""
        shared_r = r - unshared_r
        if rotate:
            sa = default_stride(shared_r, sharing_rate_a) if stride_a is None else stride_a
            sb = default_stride(shared_r, sharing_rate_b) if stride_b is None else stride_b
        else:
            sa = sb = 0
        return cls(in_features, out_features, r, unshared_r, sharing_rate_a, sharing_rate_b, sa, sb)

    @property
    def shared_r(self) -> int:
        return self.r - self.unshared_r

    @property
    def chunk_a(self) -> int:
        return chunk_width(self.in_features, self.sharing_rate_a)

    @property
    def chunk_b(self) -> int:
        return chunk_width(self.out_features, self.sharing_rate_b)

    def tensor_shapes(self) -> dict[str, tuple[int, int]]:
        """Shapes of the trainable tensors present for this geometry, keyed by SPEC suffix."""
        shapes: dict[str, tuple[int, int]] = {}
        if self.shared_r > 0:
            shapes["prolora_A_shard"] = (self.shared_r, self.chunk_a)
            shapes["prolora_B_shard"] = (self.chunk_b, self.shared_r)
        if self.unshared_r > 0:
            shapes["prolora_A_unshared"] = (self.unshared_r, self.in_features)
            shapes["prolora_B_unshared"] = (self.out_features, self.unshared_r)
        return shapes

    @property
    def num_parameters(self) -> int:
        """``r_s·(c_A + c_B) + u·(d_in + d_out)``."""
        return self.shared_r * (self.chunk_a + self.chunk_b) + self.unshared_r * (
            self.in_features + self.out_features
        )

    @property
    def lora_parameters(self) -> int:
        """Parameters of plain LoRA of the same rank: ``r·(d_in + d_out)``."""
        return self.r * (self.in_features + self.out_features)


@lru_cache(maxsize=256)
def _rotation_table(shared_r: int, chunks: int, stride: int, sign: int) -> tuple[tuple[int, ...], ...]:
    """``table[j][i] = (i + sign·j·stride) mod r_s``: which shard rank feeds rank i of chunk j."""
    return tuple(
        tuple((i + sign * j * stride) % shared_r for i in range(shared_r)) for j in range(chunks)
    )


def rotation_index(shared_r: int, chunks: int, stride: int, sign: int = 1, device=None) -> Tensor:
    """The rotation table as a (chunks, r_s) long tensor; a constant of the geometry."""
    return torch.tensor(_rotation_table(shared_r, chunks, stride, sign), dtype=torch.long, device=device)


def _rotated_chunks(shard: Tensor, chunks: int, stride: int, rank_dim: int) -> list[Tensor]:
    """``[roll(shard, -j·stride, rank_dim) for j in range(chunks)]``, the SPEC's definition."""
    return [torch.roll(shard, shifts=-j * stride, dims=rank_dim) for j in range(chunks)]


def reconstruct_a(g: ShardGeometry, a_shard: Tensor | None, a_unshared: Tensor | None) -> Tensor:
    """Full LoRA A (r × d_in): rotated shard chunks (shared ranks) then the unshared rows."""
    parts = []
    if g.shared_r > 0:
        chunks = _rotated_chunks(a_shard, g.sharing_rate_a, g.stride_a, rank_dim=0)
        parts.append(torch.cat(chunks, dim=1)[:, : g.in_features])
    if g.unshared_r > 0:
        parts.append(a_unshared)
    return torch.cat(parts, dim=0)


def reconstruct_b(g: ShardGeometry, b_shard: Tensor | None, b_unshared: Tensor | None) -> Tensor:
    """Full LoRA B (d_out × r): rotated shard chunks (shared ranks) then the unshared columns."""
    parts = []
    if g.shared_r > 0:
        chunks = _rotated_chunks(b_shard, g.sharing_rate_b, g.stride_b, rank_dim=1)
        parts.append(torch.cat(chunks, dim=0)[: g.out_features, :])
    if g.unshared_r > 0:
        parts.append(b_unshared)
    return torch.cat(parts, dim=1)


def delta_weight(
    g: ShardGeometry,
    scaling: float,
    a_shard: Tensor | None,
    b_shard: Tensor | None,
    a_unshared: Tensor | None,
    b_unshared: Tensor | None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """ΔW = γ·B·A (d_out × d_in), computed in ``dtype`` (fp32 by default, whatever the inputs)."""
    cast = [None if t is None else t.to(dtype) for t in (a_shard, b_shard, a_unshared, b_unshared)]
    a = reconstruct_a(g, cast[0], cast[2])
    b = reconstruct_b(g, cast[1], cast[3])
    return (b @ a) * scaling


def split_shards(g: ShardGeometry, a: Tensor, b: Tensor) -> dict[str, Tensor]:
    """Inverse of reconstruction: take the shards out of full A and B *without checking*.

    Use :func:`rotation_mismatch` first to prove that A and B have the PRoLoRA structure.
    """
    rs = g.shared_r
    out: dict[str, Tensor] = {}
    if rs > 0:  # chunk 0 is never truncated: c_A ≤ d_in and c_B ≤ d_out
        out["prolora_A_shard"] = a[:rs, : g.chunk_a].contiguous()
        out["prolora_B_shard"] = b[: g.chunk_b, :rs].contiguous()
    if g.unshared_r > 0:
        out["prolora_A_unshared"] = a[rs:, :].contiguous()
        out["prolora_B_unshared"] = b[:, rs:].contiguous()
    return out


def rotation_mismatch(g: ShardGeometry, a: Tensor, b: Tensor, atol: float = 0.0) -> str | None:
    """Say where full A/B break the rotated-chunk structure of ``g``, or None when they follow it.

    Each chunk j of A's shared rows must equal ``roll(chunk 0, -j·s_A, 0)`` (truncated for the
    last chunk), and likewise for B's shared columns; ``atol`` = 0 demands bit equality.
    """
    if tuple(a.shape) != (g.r, g.in_features):
        return f"A has shape {tuple(a.shape)}, expected {(g.r, g.in_features)}"
    if tuple(b.shape) != (g.out_features, g.r):
        return f"B has shape {tuple(b.shape)}, expected {(g.out_features, g.r)}"
    if g.shared_r == 0:
        return None
    shards = split_shards(g, a, b)
    a_rebuilt = reconstruct_a(g, shards["prolora_A_shard"], shards.get("prolora_A_unshared"))
    b_rebuilt = reconstruct_b(g, shards["prolora_B_shard"], shards.get("prolora_B_unshared"))
    for name, full, rebuilt, dim, width in (
        ("A", a, a_rebuilt, 1, g.chunk_a),
        ("B", b, b_rebuilt, 0, g.chunk_b),
    ):
        bad = ~torch.isclose(full, rebuilt, rtol=0.0, atol=atol)
        if bool(bad.any()):
            first = bad.nonzero()[0].tolist()
            chunk = first[dim] // width
            return (
                f"chunk {chunk} of {name} is not chunk 0 rotated by {chunk}×stride "
                f"(first differing element at {name}{first})"
            )
    return None


def compact_forward(
    g: ShardGeometry,
    scaling: float,
    x: Tensor,
    a_shard: Tensor | None,
    b_shard: Tensor | None,
    a_unshared: Tensor | None,
    b_unshared: Tensor | None,
) -> Tensor:
    """The adapter's output ``γ·(x Aᵀ) Bᵀ`` (…, d_out) without ever building A or B.

    Shared part: x is padded to m·c_A and viewed as (…, m, c_A); one matmul with A₀ᵀ gives
    z (…, m, r_s); a gather with a constant rotation table and a sum over chunks gives
    h = x·A_shᵀ (…, r_s); a second gather spreads h over the n chunks of B and one matmul
    with B₀ᵀ gives the output. Same arithmetic as rank-r LoRA, m (n) times fewer weights.
    """
    lead = x.shape[:-1]
    out = None
    if g.shared_r > 0:
        rs, m, n = g.shared_r, g.sharing_rate_a, g.sharing_rate_b
        pad = m * g.chunk_a - g.in_features
        xp = F.pad(x, (0, pad)) if pad else x
        z = xp.reshape(*lead, m, g.chunk_a) @ a_shard.t()  # (…, m, r_s)
        if g.stride_a == 0 or m == 1:
            h = z.sum(dim=-2)
        else:
            flat_a = rotation_index(rs, m, g.stride_a, 1, x.device) + rs * torch.arange(
                m, device=x.device
            ).unsqueeze(1)
            h = z.reshape(*lead, m * rs)[..., flat_a.flatten()].reshape(*lead, m, rs).sum(dim=-2)
        if g.stride_b == 0 or n == 1:
            y = (h @ b_shard.t()).unsqueeze(-2).expand(*lead, n, g.chunk_b)
        else:
            idx_b = rotation_index(rs, n, g.stride_b, -1, x.device).flatten()
            y = h[..., idx_b].reshape(*lead, n, rs) @ b_shard.t()  # (…, n, c_B)
        out = y.reshape(*lead, n * g.chunk_b)[..., : g.out_features]
    if g.unshared_r > 0:
        y_u = (x @ a_unshared.t()) @ b_unshared.t()
        out = y_u if out is None else out + y_u
    return out * scaling
