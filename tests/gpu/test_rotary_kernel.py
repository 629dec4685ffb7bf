"""Rotary embedding of q and k (rotary_kernel.py's Triton kernel, CUDA only, and packed._rotate,
the plain torch path) against a float32 rotation written independently, as complex products."""

import pytest
import torch

from esmshard.packed import _rotate

HEAD_SHAPES = [(20, 16), (20, 24), (20, 64), (40, 128)]  # (heads, head dim): ESM-2 8M, 35M, 650M, 15B


def packed_cos_sin(tokens: int, head_dim: int, generator):
    """cos, sin [T, d] float32 as PackedESM makes them: positions restart at every piece."""
    positions = []
    while len(positions) < tokens:
        positions += range(int(torch.randint(1, 1025, (), generator=generator)))
    positions = torch.tensor(positions[:tokens], dtype=torch.float32)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = positions[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def float32_rotation(x, cos, sin):
    """[T, H, d] -> [T, H, d] float32: pairs (x[i], x[i + d/2]) times e^(i angle)."""
    x = x.float()
    half = x.shape[-1] // 2
    angle = torch.complex(cos[:, None, :half], sin[:, None, :half])  # e^(i angle)
    rotated = torch.complex(x[..., :half], x[..., half:]) * angle
    return torch.cat([rotated.real, rotated.imag], dim=-1)


@pytest.mark.parametrize("implementation", ["triton", "torch"])
@pytest.mark.parametrize("heads, head_dim", HEAD_SHAPES)
@pytest.mark.parametrize("tokens", [1, 63, 64, 1000, 4099])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rotary_is_a_float32_rotation_rounded_once(device, dtype, tokens, heads, head_dim, implementation):
    if implementation == "triton" and device != "cuda":
        pytest.skip("Triton: CUDA only")
    generator = torch.Generator().manual_seed(tokens * 1000 + head_dim)
    qkv = torch.randn(tokens, 3 * heads * head_dim, generator=generator).to(device, dtype)  # [T, 3D]: q, k, v
    cos, sin = (t.to(device) for t in packed_cos_sin(tokens, head_dim, generator))
    before = qkv.clone()
    q_k_v = qkv.view(tokens, 3, heads, head_dim)
    if implementation == "triton":
        from esmshard.rotary_kernel import rotate_qk

        q, k = rotate_qk(qkv, cos, sin, heads)
    else:
        q, k = _rotate(q_k_v[:, 0], cos, sin), _rotate(q_k_v[:, 1], cos, sin)
    assert torch.equal(qkv, before)  # read only
    for part, got in enumerate((q, k)):
        assert got.dtype == dtype and got.shape == (tokens, heads, head_dim)
        want = float32_rotation(q_k_v[:, part], cos, sin)
        # one rounding to dtype: within half its epsilon of the float32 value (rtol: a whole
        # epsilon, for float32 results that differ in the last bit near a rounding boundary)
        torch.testing.assert_close(got.float(), want, rtol=torch.finfo(dtype).eps, atol=1e-5)


@pytest.mark.parametrize("heads", [5, 15, 18])  # ESM C's heads of 64: the GPU tests' 320 wide, 300M, 600M
@pytest.mark.parametrize("tokens", [1, 1000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_esmc_q_and_k_layer_norms_with_rotary_are_float32_rounded_once(cuda, dtype, tokens, heads):
    from esmshard.rotary_kernel import norm_rotate_qk

    generator = torch.Generator().manual_seed(tokens + heads)
    width = heads * 64
    qkv = (3 * torch.randn(tokens, 3 * width, generator=generator) + 1).to(cuda, dtype)  # [T, 3D]
    weights = (1 + 0.1 * torch.randn(2, width, generator=generator)).to(cuda)  # [2, D]
    cos, sin = (t.to(cuda) for t in packed_cos_sin(tokens, 64, generator))
    q, k = norm_rotate_qk(qkv, weights, 1e-5, cos, sin, heads)
    for part, got in enumerate((q, k)):
        normed = torch.nn.functional.layer_norm(
            qkv[:, part * width : (part + 1) * width].float(), (width,), weights[part]
        )
        want = float32_rotation(normed.view(tokens, heads, 64), cos, sin)
        assert got.dtype == dtype and got.shape == (tokens, heads, 64)
        torch.testing.assert_close(got.float(), want, rtol=torch.finfo(dtype).eps, atol=1e-4)
