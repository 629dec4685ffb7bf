"""Rotary position embedding of q and k as one Triton kernel (CUDA only; imported on use), and
for ESM C the LayerNorms of q and k with it.

inductor's fused code for packed._rotate (dynamic token count) moved q and k at about a sixth
of the memory bandwidth on an H200: 2.06 ms a layer for 131k tokens of ESM-2 650M, 15% of the
forward. This kernel does the same float32 arithmetic in one pass over q and k: 0.57 ms there
(2.5 TB/s counting each byte once; measured with a script since removed, in the history at
commit 758d4ed), with the same error against a float32 rotation (tests/gpu/test_rotary_kernel.py).
"""

import torch
import triton
import triton.language as tl

BLOCK_T = 64


def rotate_qk(qkv, cos, sin, heads: int):
    """qkv: [T, 3D] (q, k, v projections); cos, sin: [T, d] float32 -> rotated q, k: 2 x [T, H, d]."""
    T, D3 = qkv.shape
    D = D3 // 3
    d = D // heads
    assert qkv.stride(1) == 1 and cos.stride(1) == 1 and sin.stride(1) == 1 and cos.stride(0) == sin.stride(0)
    out = torch.empty(2, T, heads, d, dtype=qkv.dtype, device=qkv.device)
    grid = (triton.cdiv(T, BLOCK_T), heads)
    _rotary_kernel[grid](
        qkv,
        cos,
        sin,
        out,
        T,
        qkv.stride(0),
        cos.stride(0),
        out.stride(0),
        D,
        d,
        d // 2,
        triton.next_power_of_2(d // 2),
        BLOCK_T,
        num_warps=4,
    )
    return out[0], out[1]


# T only bounds the mask: not specialising on it (divisibility by 16) keeps one compiled kernel
# for every batch size, so no batch waits for a second JIT compile.
@triton.jit(do_not_specialize=["T"])
def _rotary_kernel(
    qkv,
    cos,
    sin,
    out,
    T,
    qkv_stride,
    cs_stride,
    part_stride,
    D: tl.constexpr,
    HEAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_P2: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # out[0] = rotary(q), out[1] = rotary(k), each [T, H, HEAD]; one program: BLOCK_T tokens x one head
    h = tl.program_id(1)
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)[:, None]
    i = tl.arange(0, HALF_P2)[None, :]
    mask = (t < T) & (i < HALF)
    c = tl.load(cos + t * cs_stride + i, mask=mask)  # the angles repeat: cos[:, i] == cos[:, i + HALF]
    s = tl.load(sin + t * cs_stride + i, mask=mask)
    for part in tl.static_range(2):
        src = qkv + t * qkv_stride + part * D + h * HEAD + i
        x1 = tl.load(src, mask=mask).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask).to(tl.float32)
        dst = out + part * part_stride + t * D + h * HEAD + i
        # fair-esm: x * cos + cat(-x2, x1) * sin, in float32, rounded once
        tl.store(dst, (x1 * c - x2 * s).to(out.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, (x2 * c + x1 * s).to(out.dtype.element_ty), mask=mask)


def norm_rotate_qk(qkv, weights, eps: float, cos, sin, heads: int):
    """ESM C's q and k LayerNorms (over all D, no bias) and rotary, in one pass: qkv [T, 3D];
    weights [2, D] float32 (q's, k's); cos, sin: [T, d] float32 -> q, k: 2 x [T, H, d]."""
    T, D3 = qkv.shape
    D = D3 // 3
    d = D // heads
    assert qkv.stride(1) == 1 and cos.stride(1) == 1 and cos.stride(0) == sin.stride(0) and weights.is_contiguous()
    out = torch.empty(2, T, heads, d, dtype=qkv.dtype, device=qkv.device)
    _norm_rotary_kernel[(T,)](
        qkv,
        weights,
        cos,
        sin,
        out,
        T,
        qkv.stride(0),
        cos.stride(0),
        out.stride(0),
        eps,
        D,
        heads,
        triton.next_power_of_2(heads),
        d,
        d // 2,
        triton.next_power_of_2(d // 2),
        num_warps=4,
    )
    return out[0], out[1]


@triton.jit(do_not_specialize=["T", "eps"])
def _norm_rotary_kernel(
    qkv,
    weights,
    cos,
    sin,
    out,
    T,
    qkv_stride,
    cs_stride,
    part_stride,
    eps,
    D: tl.constexpr,
    HEADS: tl.constexpr,
    HEADS_P2: tl.constexpr,
    HEAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_P2: tl.constexpr,
):
    # one program: one token's q and k, each as [heads, half] tiles of its first and second halves
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, HEADS_P2)[:, None]
    i = tl.arange(0, HALF_P2)[None, :]
    mask = (h < HEADS) & (i < HALF)
    c = tl.load(cos + t * cs_stride + i, mask=i < HALF)  # [1, HALF_P2]: the angles repeat in the second half
    s = tl.load(sin + t * cs_stride + i, mask=i < HALF)
    for part in tl.static_range(2):
        src = qkv + t * qkv_stride + part * D + h * HEAD + i
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        mean = (tl.sum(tl.sum(x1, axis=1), axis=0) + tl.sum(tl.sum(x2, axis=1), axis=0)) / D
        c1 = tl.where(mask, x1 - mean, 0.0)
        c2 = tl.where(mask, x2 - mean, 0.0)
        var = (tl.sum(tl.sum(c1 * c1, axis=1), axis=0) + tl.sum(tl.sum(c2 * c2, axis=1), axis=0)) / D
        rstd = 1.0 / tl.sqrt(var + eps)
        weight = weights + part * D + h * HEAD + i
        y1 = c1 * rstd * tl.load(weight, mask=mask, other=0.0)
        y2 = c2 * rstd * tl.load(weight + HALF, mask=mask, other=0.0)
        dst = out + part * part_stride + t * D + h * HEAD + i
        tl.store(dst, (y1 * c - y2 * s).to(out.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, (y2 * c + y1 * s).to(out.dtype.element_ty), mask=mask)
