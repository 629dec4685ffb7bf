"""ProtT5 on the GPU (its padded path behind the packed engine, in every precision, with the
float16 overflow guard) against its own float32 forward on the same device; tests/test_prott5.py
holds that forward to transformers' T5EncoderModel."""

import numpy as np
import pytest

from esmshard.architectures import MAX_RESIDUES
from esmshard.engine import PackedEngine, ReferenceEngine
from esmshard.model import load_model, write_random_checkpoint
from esmshard.outputs import OutputSpec

from .helpers import assert_rows_close, lognormal_lengths, random_residues


@pytest.fixture(scope="module")
def prott5(tmp_path_factory):
    """ProtT5-XL's proportions at 4 layers of width 256 (8 heads of 128, feed-forward 4096)."""
    return load_model(str(write_random_checkpoint(tmp_path_factory.mktemp("m") / "prott5", 4, 256, 8, family="prott5")))


@pytest.mark.parametrize("precision", ["bfloat16", "float16", "float32"])
def test_prott5_equals_its_float32_forward(device, prott5, precision):
    if device == "cpu" and precision != "float32":
        pytest.skip("half precision: CUDA only")
    network, alphabet = prott5
    spec = OutputSpec.resolve(
        [2, -1],
        ["mean", "per_residue"],
        network.num_layers,
        long_sequences="window",
        max_residues=MAX_RESIDUES["prott5"],
    )
    residues = random_residues([1, 2, 1022, 3000] + lognormal_lengths(36, seed=5), seed=6)
    batches = np.array_split(np.random.default_rng(3).permutation(len(residues)), 3)
    reference = ReferenceEngine(network, alphabet, device, "float32", spec).embed(residues)
    engine = PackedEngine(network, alphabet, device, precision, spec)
    results = list(engine.embed_batches(batches, lambda batch: [residues[i] for i in batch]))
    order = np.concatenate(batches)
    rows = np.cumsum([0, *spec.embedded_lengths([len(r) for r in residues])])
    for name in spec.names:
        got = np.concatenate([outputs[name] for _, outputs in results])
        if name.startswith("per_residue"):
            want = np.concatenate([reference[name][rows[i] : rows[i + 1]] for i in order])
        else:
            want = reference[name][order]
        assert_rows_close(got, want, precision, name)
