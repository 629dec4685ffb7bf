"""Fixtures of the GPU tests: the device and a model of a real shape.

The tests run on CUDA and skip without it. ESMSHARD_TEST_DEVICE=cpu runs them on the CPU to
debug them (what only CUDA can run still skips); ESMSHARD_TEST_DEVICE=cuda (make test-gpu) makes
a missing GPU an error instead of a skip.
"""

import os

import pytest
import torch

from esmshard.model import load_model, write_random_checkpoint


@pytest.fixture(scope="session")
def device() -> str:
    wanted = os.environ.get("ESMSHARD_TEST_DEVICE", "")
    if wanted == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        if wanted == "cuda":
            pytest.fail(f"ESMSHARD_TEST_DEVICE=cuda, but torch {torch.__version__} sees no CUDA device")
        pytest.skip("no CUDA device (ESMSHARD_TEST_DEVICE=cpu runs these tests on the CPU)")
    return "cuda"


@pytest.fixture
def cuda(device) -> str:
    """For what runs on CUDA only (the Triton kernels, real out-of-memory)."""
    if device != "cuda":
        pytest.skip("CUDA only")
    return device


@pytest.fixture(scope="session", params=["esm2", "esm1b", "esmc"])
def t6(request, tmp_path_factory):
    """esm2_t6_8M's shape (6 layers, width 320; 20 heads of 16, ESM C's 5 of 64) with random
    weights, of each family (ESM-2; ESM-1b's architecture: learned positions, a LayerNorm on the
    embeddings; ESM C), written in its release file format and read by esmshard's loader:
    (the family's module on the CPU, alphabet)."""
    family = request.param
    path = tmp_path_factory.mktemp("model") / f"{family}_t6_random.pt"
    heads = 5 if family == "esmc" else 20
    return load_model(str(write_random_checkpoint(path, 6, 320, heads, seed=0, family=family)))
