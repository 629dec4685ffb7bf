"""ESM C's SwiGLU, silu(gate) x value over the two halves of its feed-forward's first projection,
as one Triton kernel (CUDA only; imported on use).

Eager torch spends two kernels on it, neither vectorised (each half is a strided view of the
[T, 2F] projection): silu writes [T, F] in the compute dtype and the product reads that back
with the value. This one reads the gate and the value once and writes the product once, in
float32 arithmetic rounded once to the compute dtype (tests/gpu/test_swiglu_kernel.py): on an
H100, 28.5 ms per 131k-token batch of ESM C 600M where torch's two took 88.7 ms (20% of the
forward), 286k -> 326k residues/s (bench/engine_profile.py, docs/benchmarks.md).
"""

import torch
import triton
import triton.language as tl

BLOCK_F = 1024


def swiglu(projected):
    """projected: [T, 2F] (each row the gate's F values, then the value's) -> silu(gate) * value: [T, F]."""
    T, F2 = projected.shape
    assert projected.stride(1) == 1 and F2 % 2 == 0
    out = torch.empty(T, F2 // 2, dtype=projected.dtype, device=projected.device)
    grid = (T, triton.cdiv(F2 // 2, BLOCK_F))
    _swiglu_kernel[grid](projected, out, projected.stride(0), F2 // 2, BLOCK_F, num_warps=4)
    return out


@triton.jit
def _swiglu_kernel(projected, out, row_stride, F: tl.constexpr, BLOCK_F: tl.constexpr):
    # one program: BLOCK_F columns of one token's row
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = cols < F
    gate = tl.load(projected + row * row_stride + cols, mask=mask).to(tl.float32)
    value = tl.load(projected + row * row_stride + F + cols, mask=mask).to(tl.float32)
    tl.store(out + row * F + cols, (gate * tl.sigmoid(gate) * value).to(out.dtype.element_ty), mask=mask)
