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


def _rotated_chunks(shard: Tensor, chunks: int, stride: int, rank_dim: int) -> list[Tensor]:
    """``[roll(shard, -j·stride, rank_dim) for j in range(chunks)]``, the SPEC's definition."""
    return [torch.roll(shard, shifts=-j * stride, dims=rank_dim) for j in range(chunks)]


def rotation_table(shared_r: int, chunks: int, stride: int) -> list[list[int]]:
    """``table[i][j]``: the shard rank that rank i of chunk j reads, ``(i + j·stride) mod r_s`` (SPEC §1)."""
    return [[(i + j * stride) % shared_r for j in range(chunks)] for i in range(shared_r)]


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
def route_matrix(
    shared_r: int,
    unshared_r: int,
    m: int,
    n: int,
    stride_a: int,
    stride_b: int,
    scaling: float,
    dtype: torch.dtype,
    device: str,
) -> Tensor:
    """Every gather of the compact forward as ONE constant matrix, γ included: (m·R_A, n·R_B).

    Input row layout (per token): for each A chunk j, the R_A = r_s + m·u outputs of the stacked
    A (:func:`stacked_shards`) on x's chunk j: r_s shard ranks, then A_u's rows cut into chunks.
    Output layout: for each B chunk k, the R_B = r_s + n·u inputs of the stacked B for that chunk.
    Shared ranks: chunk j's entry p is rank ``i = (p − j·s_A) mod r_s`` of h = x·A_shᵀ, which B
    chunk k reads at position ``(i + k·s_B) mod r_s``. Unshared rank v: only chunk j's piece of
    row v counts (summed over j into t_v = x·A_uᵀ), and B chunk k reads t_v in its own slot
    ``r_s + k·u + v`` (the other chunks' slots stay 0). Every input row has exactly one γ per B chunk.
    Cached: built once per geometry, γ and device.
    """
    rows_a, rows_b = shared_r + m * unshared_r, shared_r + n * unshared_r
    route = torch.zeros(m * rows_a, n * rows_b, dtype=torch.float64)
    for j in range(m):
        for k in range(n):
            for p in range(shared_r):
                route[j * rows_a + p, k * rows_b + (p - j * stride_a + k * stride_b) % shared_r] = scaling
            for v in range(unshared_r):
                route[j * rows_a + shared_r + v * m + j, k * rows_b + shared_r + k * unshared_r + v] = scaling
    return route.to(dtype=dtype, device=device)


def stacked_shards(
    g: ShardGeometry, a_shard: Tensor, b_shard: Tensor, a_unshared: Tensor | None, b_unshared: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(A₀ with A_u's rows cut into m chunks below it, B₀ with B_u's rows cut into n chunks beside it).

    Shapes (r_s + m·u, c_A) and (c_B, r_s + n·u): the adapter's own size, not A's or B's. They let
    the shared and unshared paths run as ONE matmul each side (x and the output gradient read
    once), with :func:`route_matrix` selecting what each chunk needs. For u = 0: (A₀, B₀) as is.
    """
    if g.unshared_r == 0:
        return a_shard, b_shard
    u, m, n = g.unshared_r, g.sharing_rate_a, g.sharing_rate_b
    pad_a, pad_b = m * g.chunk_a - g.in_features, n * g.chunk_b - g.out_features
    a_u = F.pad(a_unshared, (0, pad_a)) if pad_a else a_unshared
    b_u = F.pad(b_unshared, (0, 0, 0, pad_b)) if pad_b else b_unshared
    b_u = b_u.reshape(n, g.chunk_b, u).transpose(0, 1).reshape(g.chunk_b, n * u)
    return torch.cat([a_shard, a_u.reshape(u * m, g.chunk_a)]), torch.cat([b_shard, b_u], dim=1)


def compact_forward(
    g: ShardGeometry,
    scaling: float,
    x: Tensor,
    a_shard: Tensor | None,
    b_shard: Tensor | None,
    a_unshared: Tensor | None,
    b_unshared: Tensor | None,
    stacks: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """The adapter's output ``γ·(x Aᵀ) Bᵀ`` (…, d_out) without ever building A or B.

    x is padded to m·c_A and viewed as (N·m, c_A); one matmul with the stacked A
    (:func:`stacked_shards`: A₀ and A_u's chunks) gives every chunk's shared and unshared
    partial products; one matmul with the constant :func:`route_matrix` does both rotation
    gathers, the chunk sums and γ; one matmul with the stacked B gives the output, viewed
    back to (N, d_out). Three matmuls whatever u is (x and the output gradient each read once),
    rank-r LoRA's arithmetic with m (n) times fewer weights. ``stacks`` passes stacked shards
    made earlier (the layer caches them for inference). u = r (no shards) is plain LoRA.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, g.in_features)
    rows = x2.shape[0]
    if g.shared_r == 0:
        return F.linear(F.linear(x2, a_unshared) * scaling, b_unshared).reshape(*lead, g.out_features)
    rs, u, m, n = g.shared_r, g.unshared_r, g.sharing_rate_a, g.sharing_rate_b
    a_stack, b_stack = stacks if stacks is not None else stacked_shards(g, a_shard, b_shard, a_unshared, b_unshared)
    pad = m * g.chunk_a - g.in_features
    xp = F.pad(x2, (0, pad)) if pad else x2
    z = F.linear(xp.reshape(rows * m, g.chunk_a), a_stack).view(rows, m * (rs + m * u))
    z = z @ route_matrix(rs, u, m, n, g.stride_a, g.stride_b, float(scaling), z.dtype, str(z.device))
    y = F.linear(z.view(rows * n, rs + n * u), b_stack).view(rows, n * g.chunk_b)
    # slicing even the full width would cost backward a zero-filled copy of the gradient
    out = y if n * g.chunk_b == g.out_features else y[:, : g.out_features]
    return out.reshape(*lead, g.out_features)


# --------------------------------------------------------------------------- expanded → compact
# Full factors as a PEFT LoRA file holds them are turned back into shards only when the chunk
# structure is proven bit for bit. Both factors are handled as "shared" matrices of shape
# (r_s × W): A's first r_s rows, and B's first r_s columns transposed; W may exceed the layer
# (the reference cuts its expanded tensors at fixed lengths, the tail continuing the rotation).


def _bits(t: Tensor) -> Tensor:
    """The raw bit patterns of a float tensor as integers: equality here is bitwise (−0.0 ≠ 0.0)."""
    return t.contiguous().view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def periodic_widths(shared: Tensor, widths: list[int]) -> list[int]:
    """The chunk widths c of ``widths`` for which every column of ``shared`` (r_s × W) holds the same
    multiset of bit patterns as the column c places before it: a necessary condition for the rotated
    chunk structure (a rotation permutes a column), checked in O(W) per width on exact integer sums."""
    if shared.shape[0] == 0:
        return list(widths)
    bits = _bits(shared).to(torch.int64)
    fingerprint = torch.stack([bits.sum(0), (bits * bits).sum(0), (bits >> 7).pow(3).sum(0)])
    width = shared.shape[1]
    return [c for c in widths if c >= width or torch.equal(fingerprint[:, c:], fingerprint[:, : width - c])]


def rotation_strides(shared: Tensor, chunk: int) -> list[int]:
    """The strides s in [0, r_s) with which ``shared`` (r_s × W) is its first chunk (``chunk`` columns)
    repeated and rotated: chunk j equals ``roll(chunk 0, −j·s, 0)``, the last chunk cut (SPEC §1).

    Bitwise. Every stride when there is one chunk (a stride is irrelevant then); none when the
    structure does not hold. Strides are only meaningful modulo r_s, hence the range.
    """
    shared_r, width = shared.shape
    if shared_r == 0 or width <= chunk:
        return list(range(max(shared_r, 1)))
    bits = _bits(shared)
    first, second = bits[:, :chunk], bits[:, chunk : 2 * chunk]
    found = []
    for stride in range(shared_r):
        if not torch.equal(second, torch.roll(first, -stride, 0)[:, : second.shape[1]]):
            continue
        rebuilt = torch.cat(_rotated_chunks(first, -(-width // chunk), stride, rank_dim=0), dim=1)[:, :width]
        if torch.equal(rebuilt, bits):
            found.append(stride)
    return found


def first_unrotated_chunk(shared: Tensor, chunk: int) -> int | None:
    """The first chunk j ≥ 1 of ``shared`` (r_s × W) that no rotation of chunk 0 reproduces bitwise
    (for the error message when no stride fits), or None when each chunk alone is some rotation."""
    shared_r, width = shared.shape
    bits = _bits(shared)
    first = bits[:, :chunk]
    for j in range(1, -(-width // chunk)):
        piece = bits[:, j * chunk : (j + 1) * chunk]
        if not any(torch.equal(piece, torch.roll(first, -s, 0)[:, : piece.shape[1]]) for s in range(shared_r)):
            return j
    return None
