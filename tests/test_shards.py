"""Property tests of prolora_export.shards against an independent float64 reference.

The reference is written element by element straight from SPEC §1 ("row i of chunk j
of A is A₀[(i + j·s_A) mod r_s]; column i of chunk j of B is B₀[:, (i + j·s_B) mod r_s]"),
with plain Python loops: it calls nothing in prolora_export.shards.
"""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prolora_export.shards import (
    ShardGeometry,
    compact_forward,
    delta_weight,
    reconstruct_a,
    reconstruct_b,
    rotation_mismatch,
    split_shards,
)


def ref_full_a(a0, a_u, d_in: int, m: int, s_a: int) -> torch.Tensor:
    """A (r × d_in): column k lies in chunk j = k // c_A at offset k % c_A; shared row i reads A₀[(i + j·s_A) % r_s]."""
    rs = 0 if a0 is None else a0.shape[0]
    u = 0 if a_u is None else a_u.shape[0]
    c_a = math.ceil(d_in / m)
    out = torch.zeros(rs + u, d_in, dtype=torch.float64)
    for k in range(d_in):
        j, off = divmod(k, c_a)
        for i in range(rs):
            out[i, k] = a0[(i + j * s_a) % rs, off]
        for i in range(u):
            out[rs + i, k] = a_u[i, k]
    return out


def ref_full_b(b0, b_u, d_out: int, n: int, s_b: int) -> torch.Tensor:
    """B (d_out × r): row k lies in chunk j = k // c_B; shared column i reads B₀[:, (i + j·s_B) % r_s]."""
    rs = 0 if b0 is None else b0.shape[1]
    u = 0 if b_u is None else b_u.shape[1]
    c_b = math.ceil(d_out / n)
    out = torch.zeros(d_out, rs + u, dtype=torch.float64)
    for k in range(d_out):
        j, off = divmod(k, c_b)
        for i in range(rs):
            out[k, i] = b0[off, (i + j * s_b) % rs]
        for i in range(u):
            out[k, rs + i] = b_u[k, i]
    return out


@st.composite
def cases(draw, explicit_strides: bool | None = None):
    r = draw(st.integers(1, 9))
    u = draw(st.integers(0, r))
    m, n = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    d_in, d_out = draw(st.integers(1, 23)), draw(st.integers(1, 23))  # m > d_in happens too
    rotate = draw(st.booleans())
    rs = r - u
    explicit = draw(st.booleans()) if explicit_strides is None else explicit_strides
    sa = draw(st.integers(0, max(rs - 1, 0))) if explicit else None
    sb = draw(st.integers(0, max(rs - 1, 0))) if explicit else None
    g = ShardGeometry.build(d_in, d_out, r, u, m, n, rotate, sa, sb)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    shapes = g.tensor_shapes()

    def rand(name):
        return torch.randn(shapes[name], generator=gen, dtype=torch.float64) if name in shapes else None

    tensors = tuple(rand(k) for k in ("prolora_A_shard", "prolora_B_shard", "prolora_A_unshared", "prolora_B_unshared"))
    # the strides the reference must use, resolved from SPEC's table independently of ShardGeometry
    exp_sa = (max(rs // m, 1) if sa is None else sa) if rotate else 0
    exp_sb = (max(rs // n, 1) if sb is None else sb) if rotate else 0
    return g, tensors, exp_sa, exp_sb, gen


@settings(max_examples=150, deadline=None)
@given(case=cases())
def test_reconstruction_matches_spec(case) -> None:
    g, (a0, b0, a_u, b_u), sa, sb, _ = case
    assert (g.stride_a, g.stride_b) == (sa, sb)
    torch.testing.assert_close(reconstruct_a(g, a0, a_u), ref_full_a(a0, a_u, g.in_features, g.sharing_rate_a, sa))
    torch.testing.assert_close(reconstruct_b(g, b0, b_u), ref_full_b(b0, b_u, g.out_features, g.sharing_rate_b, sb))


@settings(max_examples=150, deadline=None)
@given(case=cases(), scaling=st.floats(0.1, 4.0), lead=st.sampled_from([(3,), (2, 5), (1, 1, 4)]))
def test_delta_and_compact_forward_match_spec(case, scaling: float, lead) -> None:
    g, (a0, b0, a_u, b_u), sa, sb, gen = case
    a = ref_full_a(a0, a_u, g.in_features, g.sharing_rate_a, sa)
    b = ref_full_b(b0, b_u, g.out_features, g.sharing_rate_b, sb)
    expected_delta = scaling * (b @ a)
    got = delta_weight(g, scaling, a0, b0, a_u, b_u, dtype=torch.float64)
    torch.testing.assert_close(got, expected_delta, rtol=1e-12, atol=1e-12)

    x = torch.randn(*lead, g.in_features, generator=gen, dtype=torch.float64)
    y = compact_forward(g, scaling, x, a0, b0, a_u, b_u)
    assert y.shape == (*lead, g.out_features)
    torch.testing.assert_close(y, scaling * (x @ a.t()) @ b.t(), rtol=1e-10, atol=1e-10)


@settings(max_examples=60, deadline=None)
@given(case=cases())
def test_compact_forward_fp32_and_backward(case) -> None:
    """fp32 inputs (what the layer uses) and gradients agree with the dense reference."""
    g, tensors, sa, sb, gen = case
    params = [None if t is None else t.float().requires_grad_(True) for t in tensors]
    x = torch.randn(4, g.in_features, generator=gen)
    compact_forward(g, 0.5, x, *params).square().sum().backward()
    a0, b0, a_u, b_u = [None if t is None else t.detach().double().requires_grad_(True) for t in params]
    full_a = torch.cat([t for t in (_gather_a(a0, g, sa), a_u) if t is not None])
    full_b = torch.cat([t for t in (_gather_b(b0, g, sb), b_u) if t is not None], dim=1)
    with torch.no_grad():  # the differentiable gather is the same rule as the loop reference
        torch.testing.assert_close(full_a, ref_full_a(a0, a_u, g.in_features, g.sharing_rate_a, sa))
        torch.testing.assert_close(full_b, ref_full_b(b0, b_u, g.out_features, g.sharing_rate_b, sb))
    (0.5 * (x.double() @ full_a.t()) @ full_b.t()).square().sum().backward()
    # fp32 rounding of a gradient element scales with the whole tensor's magnitude (cancelling terms),
    # not with the element: over 8,400 drawn tensors |error| / max|ref| reached 1.6e-5, and dense fp32
    # LoRA's own gradients reached the same, so atol follows the tensor's scale; a wrong gather is O(1)
    for ours, ref in zip(params, (a0, b0, a_u, b_u), strict=True):
        if ours is not None:
            scale = float(ref.grad.abs().max())
            torch.testing.assert_close(ours.grad.double(), ref.grad, rtol=1e-4, atol=max(1e-5, 1e-4 * scale))


def _gather_a(a0, g, s_a):
    """SPEC's element rule as a differentiable gather (index lists from plain Python)."""
    if a0 is None:
        return None
    rs, c_a = a0.shape
    rows = [[(i + (k // c_a) * s_a) % rs for k in range(g.in_features)] for i in range(rs)]
    cols = [[k % c_a for k in range(g.in_features)] for _ in range(rs)]
    return a0[torch.tensor(rows), torch.tensor(cols)]


def _gather_b(b0, g, s_b):
    if b0 is None:
        return None
    c_b, rs = b0.shape
    rows = [[k % c_b for _ in range(rs)] for k in range(g.out_features)]
    cols = [[(i + (k // c_b) * s_b) % rs for i in range(rs)] for k in range(g.out_features)]
    return b0[torch.tensor(rows), torch.tensor(cols)]


@settings(max_examples=80, deadline=None)
@given(case=cases())
def test_split_inverts_reconstruction_and_mismatch_finds_corruption(case) -> None:
    g, (a0, b0, a_u, b_u), _, _, gen = case
    a, b = reconstruct_a(g, a0, a_u), reconstruct_b(g, b0, b_u)
    assert rotation_mismatch(g, a, b) is None
    back = split_shards(g, a, b)
    for name, t in zip(
        ("prolora_A_shard", "prolora_B_shard", "prolora_A_unshared", "prolora_B_unshared"),
        (a0, b0, a_u, b_u),
        strict=True,
    ):
        if t is not None:
            assert torch.equal(back[name], t)
    if g.shared_r > 0 and g.in_features > g.chunk_a:  # a second chunk of A exists: corrupt one element in it
        k = g.chunk_a + int(torch.randint(g.in_features - g.chunk_a, (1,), generator=gen))
        bad = a.clone()
        bad[0, k] += 1.0
        msg = rotation_mismatch(g, bad, b)
        assert msg is not None and f"chunk {k // g.chunk_a} of A" in msg


def test_default_strides_follow_spec() -> None:
    assert ShardGeometry.build(10, 10, 8, 1, 2, 3).stride_a == 3  # floor(7/2)
    assert ShardGeometry.build(10, 10, 8, 1, 2, 3).stride_b == 2  # floor(7/3)
    assert ShardGeometry.build(10, 10, 8, 6, 4, 4).stride_a == 1  # max(floor(2/4), 1)
    assert ShardGeometry.build(10, 10, 8, 1, 2, 2, rotate=False).stride_a == 0
    g = ShardGeometry.build(576, 1536, 8, 1, 2, 2)
    assert g.num_parameters == 7 * (288 + 768) + 1 * (576 + 1536)
    assert g.lora_parameters == 8 * (576 + 1536)
