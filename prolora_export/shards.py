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

#: The four trainable tensors of one layer, in the order every function here takes them
#: (A₀, B₀, A_u, B_u); also the suffixes of their keys in ``adapter_model.safetensors``.
TENSOR_NAMES = ("prolora_A_shard", "prolora_B_shard", "prolora_A_unshared", "prolora_B_unshared")


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
        return self.shared_r * (self.chunk_a + self.chunk_b) + self.unshared_r * (self.in_features + self.out_features)

    @property
    def lora_parameters(self) -> int:
        """Parameters of plain LoRA of the same rank: ``r·(d_in + d_out)``."""
        return self.r * (self.in_features + self.out_features)


@lru_cache(maxsize=256)
def _rotation_table(shared_r: int, chunks: int, stride: int, sign: int) -> tuple[tuple[int, ...], ...]:
    """``table[j][i] = (i + sign·j·stride) mod r_s``: which shard rank feeds rank i of chunk j."""
    return tuple(tuple((i + sign * j * stride) % shared_r for i in range(shared_r)) for j in range(chunks))


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
    b, a = full_factors(g, a_shard, b_shard, a_unshared, b_unshared, dtype)
    return (b @ a) * scaling


def full_factors(
    g: ShardGeometry,
    a_shard: Tensor | None,
    b_shard: Tensor | None,
    a_unshared: Tensor | None,
    b_unshared: Tensor | None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """(B, A) reconstructed in ``dtype``: for callers that apply ΔW piecewise (a row block at a time)."""
    cast = [None if t is None else t.to(dtype) for t in (a_shard, b_shard, a_unshared, b_unshared)]
    return reconstruct_b(g, cast[1], cast[3]), reconstruct_a(g, cast[0], cast[2])


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


@lru_cache(maxsize=256)
def _spread_matrix(
    shared_r: int, m: int, n: int, stride_a: int, stride_b: int, dtype: torch.dtype, device: str
) -> Tensor:
    """Both gathers of the compact forward as ONE constant 0/1 matrix M (m·r_s, n·r_s).

    ``z @ M`` first sums chunk j's entry ``(i + j·s_A) mod r_s`` into rank i (h = x·A_shᵀ),
    then puts ``h[(i − j·s_B) mod r_s]`` at position ``j·r_s + i`` for each chunk j of B.
    Every row of M has exactly one 1 per B chunk: no rounding beyond the chunk sum itself;
    it costs N·m·n·r_s² flops (nothing next to the d_in-wide matmul) and its backward is a
    matmul too, unlike a gather's scatter-add. Cached: built once per geometry and device.
    """
    table_a = rotation_index(shared_r, m, stride_a, 1).flatten()
    table_b = rotation_index(shared_r, n, stride_b, -1).flatten()
    pos_a, pos_b = torch.arange(m * shared_r), torch.arange(n * shared_r)
    gather_sum = torch.zeros(m * shared_r, shared_r, dtype=torch.float64)
    gather_sum[table_a + shared_r * (pos_a // shared_r), pos_a % shared_r] = 1
    spread = torch.zeros(shared_r, n * shared_r, dtype=torch.float64)
    spread[table_b, pos_b] = 1
    return (gather_sum @ spread).to(dtype=dtype, device=device)


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

    Shared part: x is padded to m·c_A and viewed as (N·m, c_A); one matmul with A₀ᵀ gives
    z (N, m·r_s); the rotated sum over chunks gives h = x·A_shᵀ (N, r_s); a second gather
    spreads h over the n chunks of B and one matmul with B₀ᵀ gives the output. Both gathers
    use the constant rotation tables and are done together as one matmul with a constant
    0/1 matrix (:func:`_spread_matrix`). Same arithmetic as rank-r LoRA, m (n) times fewer weights.
    γ is applied to a rank-sized intermediate or inside ``addmm``, which also accumulates
    the unshared product into the shared one: no extra pass over the d_out-wide output,
    which is what keeps this as fast as PEFT's two matmuls.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, g.in_features)
    rows = x2.shape[0]
    out = None
    if g.shared_r > 0:
        rs, m, n = g.shared_r, g.sharing_rate_a, g.sharing_rate_b
        pad = m * g.chunk_a - g.in_features
        xp = F.pad(x2, (0, pad)) if pad else x2
        z = F.linear(xp.reshape(rows * m, g.chunk_a), a_shard).view(rows, m * rs)
        if m > 1 or n > 1:  # both rotation gathers (and the chunk sum) as one constant matmul
            z = z @ _spread_matrix(rs, m, n, g.stride_a, g.stride_b, z.dtype, str(z.device))  # (N, n·r_s)
        if g.unshared_r == 0:
            z = z * scaling  # rank-sized: cheaper than scaling the output
        y = F.linear(z.view(rows * n, rs), b_shard).view(rows, n * g.chunk_b)
        out = y[:, : g.out_features]
    if g.unshared_r > 0:
        t = F.linear(x2, a_unshared)  # (N, u)
        if out is None:
            out = F.linear(t * scaling, b_unshared)
        else:  # γ·y_s + γ·t·B_uᵀ in one pass over the output
            out = torch.addmm(out, t, b_unshared.t(), beta=scaling, alpha=scaling)
    return out.reshape(*lead, g.out_features)
