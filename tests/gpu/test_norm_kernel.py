"""The residual add and LayerNorm of the packed layers (norm_kernel.py's Triton kernel, CUDA only,
and the plain torch path) against a float64 LayerNorm rounded once to the compute dtype."""

import pytest
import torch

from esmshard import packed

WIDTHS = [320, 1280, 2560, 5120]  # ESM-2 8M, 650M, 3B, 15B


@pytest.mark.parametrize("implementation", ["triton", "torch"])
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("tokens", [1, 1000, 4099])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("add", [False, True])
def test_layer_norm_is_float64s_rounded_once(device, monkeypatch, add, dtype, tokens, width, implementation):
    if implementation == "triton" and device != "cuda":
        pytest.skip("Triton: CUDA only")
    monkeypatch.setattr(packed, "NORM_KERNEL", implementation == "triton")
    generator = torch.Generator().manual_seed(tokens * 10 + width)
    # a residual stream's scale: large values, an offset per token (what makes a naive variance lose digits)
    x = 30 * torch.randn(tokens, width, generator=generator) + torch.randn(tokens, 1, generator=generator) * 100
    residual = torch.randn(tokens, width, generator=generator).to(dtype) if add else None
    weight = 1 + 0.1 * torch.randn(width, generator=generator)
    bias = 0.1 * torch.randn(width, generator=generator)
    x, weight, bias = x.to(device), weight.to(device), bias.to(device)
    before = x.clone()
    summed, normed = packed.added_and_normed(x, residual.to(device) if add else None, weight, bias, 1e-5, dtype)
    assert torch.equal(x, before)  # the stream passed in is not changed (the caller may still read it)
    want_sum = before + residual.to(device).float() if add else before
    assert summed.dtype == torch.float32 and torch.equal(summed, want_sum)
    want = torch.nn.functional.layer_norm(want_sum.double(), (width,), weight.double(), bias.double(), 1e-5)
    assert normed.dtype == dtype and normed.shape == (tokens, width)
    # one rounding to dtype: within its epsilon of the float64 value (float32 arithmetic on the way)
    torch.testing.assert_close(normed.double(), want, rtol=torch.finfo(dtype).eps, atol=1e-4)
