"""ESM C's SwiGLU (swiglu_kernel.py's Triton kernel, CUDA only) against silu(gate) x value in
float64, and the packed ESM C module with it against the same module without it."""

import pytest
import torch

from esmshard import packed
from esmshard.esmc import ESMC, ffn_width


@pytest.mark.parametrize("width", [320, 960, 1152])  # the GPU tests' ESM C, 300M, 600M
@pytest.mark.parametrize("tokens", [1, 7, 1000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_swiglu_is_silu_gate_times_value_rounded_once(cuda, dtype, tokens, width):
    from esmshard.swiglu_kernel import swiglu

    generator = torch.Generator().manual_seed(tokens + width)
    hidden = ffn_width(width)  # not a multiple of the kernel's block at 320 (768) and 960 (2560)
    projected = (3 * torch.randn(tokens, 2 * hidden, generator=generator)).to(cuda, dtype)  # [T, 2F]
    before = projected.clone()
    got = swiglu(projected)
    assert torch.equal(projected, before)  # read only
    gate, value = projected.double().chunk(2, dim=-1)
    want = gate * torch.sigmoid(gate) * value
    assert got.dtype == dtype and got.shape == (tokens, hidden)
    # float32 arithmetic rounded once: within an epsilon of the exact value
    torch.testing.assert_close(got.double(), want, rtol=torch.finfo(dtype).eps, atol=1e-5)


def test_packed_esmc_with_the_kernel_equals_it_without(cuda, monkeypatch):
    """The kernel rounds silu(gate) x value once where torch rounds silu(gate) first: the same
    hidden states to within float16's rounding of the 4 layers."""
    torch.manual_seed(0)
    network = ESMC(320, 5, 4).eval()
    tokens = torch.randint(4, 24, (600,), device=cuda)
    cu_seqlens = torch.tensor([0, 100, 350, 600], dtype=torch.int32, device=cuda)
    positions = torch.cat([torch.arange(n, device=cuda) for n in cu_seqlens.diff().tolist()])
    outputs = []
    for kernel in (True, False):
        monkeypatch.setattr(packed, "SWIGLU_KERNEL", kernel)
        model = packed.packed_model(network, torch.float16, cuda).eval()
        assert model.layers[0].swiglu_kernel is kernel
        with torch.inference_mode():
            outputs.append(dict(model.hidden_states(tokens, positions, cu_seqlens, 250, [2, 4])))
    for layer in (2, 4):
        with_kernel, without = outputs[0][layer], outputs[1][layer]
        assert (with_kernel - without).norm() / without.norm() < 1e-3
