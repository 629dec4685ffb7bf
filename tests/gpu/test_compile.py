"""compile False / True / "tuned" give the same vectors, within the bfloat16 tolerance (CUDA only:
on the GPU the compiled path also rotates q and k with the Triton kernel)."""

import numpy as np
import pytest
import torch

from esmshard.engine import PackedEngine
from esmshard.outputs import POOLINGS, OutputSpec

from .helpers import assert_rows_close, lognormal_lengths, random_residues

pytestmark = pytest.mark.compile


@pytest.fixture(scope="module")
def batch(t6):
    """(spec, one mixed batch of residues, with a windowed protein)."""
    network, alphabet = t6
    spec = OutputSpec.resolve([3, -1], POOLINGS, network.num_layers, long_sequences="window")
    residues = random_residues([1, 2, 50, 300, 1022, 3000] + lognormal_lengths(20, seed=4), seed=5)
    return spec, residues


@pytest.mark.parametrize("compile", [True, "tuned"])
def test_compiled_engine_gives_the_eager_vectors(cuda, t6, batch, compile):
    network, alphabet = t6
    spec, residues = batch
    eager = PackedEngine(network, alphabet, cuda, "bfloat16", spec, compile=False).embed(residues)
    torch._dynamo.reset()  # compile afresh, with this mode's options
    compiled = PackedEngine(network, alphabet, cuda, "bfloat16", spec, compile=compile).embed(residues)
    assert sorted(compiled) == sorted(spec.names)
    for name in spec.names:
        assert np.isfinite(compiled[name]).all(), name
        assert_rows_close(compiled[name], eager[name], "bfloat16", f"compile={compile!r} {name}")
