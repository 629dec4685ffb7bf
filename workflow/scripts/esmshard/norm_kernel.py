"""LayerNorm of the float32 residual stream, cast to the compute dtype, as one Triton kernel
(CUDA only; imported on use), optionally adding a branch's output to the stream first.

Eager torch spends three kernels on what a layer needs here (add, layer_norm, cast), each
reading and writing the [T, D] stream in float32: this one reads it once and writes the new
stream and the normed copy. The arithmetic is F.layer_norm's, in float32 (mean, biased
variance, eps inside the square root), rounded once to the compute dtype
(tests/gpu/test_norm_kernel.py).
"""

import torch
import triton
import triton.language as tl


def layer_norm(x, weight, bias, eps: float, dtype: torch.dtype, residual=None):
    """x: [T, D] float32 (contiguous); weight, bias: [D] float32; residual: [T, D] in ``dtype``, or
    None -> (x + residual in float32, or x itself; LayerNorm of that in ``dtype``)."""
    T, D = x.shape
    assert x.dtype == torch.float32 and x.stride(1) == 1
    assert residual is None or (residual.dtype == dtype and residual.stride(1) == 1)
    normed = torch.empty(T, D, dtype=dtype, device=x.device)
    summed = x if residual is None else torch.empty_like(x)
    block = triton.next_power_of_2(D)
    # Without a residual, normed stands in for it (never read): the same argument types either
    # way, so Triton compiles one kernel per width and dtype, not two (each ~1 s on a fresh machine).
    added = normed if residual is None else residual
    _layer_norm_kernel[(T,)](
        x,
        added,
        weight,
        bias,
        summed,
        normed,
        eps,
        x.stride(0),
        added.stride(0),
        int(residual is not None),
        D,
        block,
        num_warps=min(16, max(4, block // 512)),
    )
    return summed, normed


@triton.jit(do_not_specialize=["add"])
def _layer_norm_kernel(
    x,
    residual,
    weight,
    bias,
    summed,
    normed,
    eps,
    x_stride,
    residual_stride,
    add,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # one program: one token's row of D values
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    v = tl.load(x + row * x_stride + cols, mask=mask, other=0.0)
    if add:
        v += tl.load(residual + row * residual_stride + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(summed + row * D + cols, v, mask=mask)
    mean = tl.sum(v, axis=0) / D
    centred = tl.where(mask, v - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / D + eps)
    w = tl.load(weight + cols, mask=mask)
    b = tl.load(bias + cols, mask=mask)
    tl.store(normed + row * D + cols, (centred * rstd * w + b).to(normed.dtype.element_ty), mask=mask)
