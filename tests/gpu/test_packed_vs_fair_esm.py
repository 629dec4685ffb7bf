"""The packed engine against fair-esm's own forward (ESM2's, ProteinBertModel's for ESM-1b) in
float32 on the same device, same weights: every pooling, a middle and the last layer, every
precision, mixed batches with windowed proteins."""

import copy
import functools

import numpy as np
import pytest

from esmshard.engine import PackedEngine
from esmshard.outputs import POOLINGS, OutputSpec

from .helpers import assert_rows_close, fair_esm_outputs, lognormal_lengths, random_residues, rows_of

LENGTHS = [1, 2, 50, 300, 1022, 3000]  # 3000: five windows of 1022
LAYERS = {"middle": 3, "last": 6}


@pytest.fixture(scope="module")
def case(t6, device):
    """(spec, residues, batches, fair-esm's outputs): the lengths above and 26 log-normal ones,
    shuffled into 3 batches."""
    network, alphabet = t6
    spec = OutputSpec.resolve(
        list(LAYERS.values()), POOLINGS, network.num_layers, long_sequences="window", max_residues=1022
    )
    residues = random_residues(LENGTHS + lognormal_lengths(26, seed=1), seed=2)
    batches = np.array_split(np.random.default_rng(3).permutation(len(residues)), 3)
    reference = fair_esm_outputs(copy.deepcopy(network).to(device).float(), alphabet, spec, residues, device)
    return spec, residues, batches, reference


@pytest.fixture(scope="module")
def packed(t6, device, case):
    """precision -> the packed engine's (batch, outputs) for the case's batches, computed once."""
    network, alphabet = t6
    spec, residues, batches, _ = case

    @functools.cache
    def run(precision):
        engine = PackedEngine(network, alphabet, device, precision, spec)
        return list(engine.embed_batches(batches, lambda batch: [residues[i] for i in batch]))

    return run


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("precision", ["bfloat16", "float16", "float32"])
def test_packed_engine_equals_fair_esm(case, packed, precision, pooling, layer):
    spec, residues, batches, reference = case
    name = f"{pooling}/layer_{LAYERS[layer]}"
    results = packed(precision)
    assert [b.tolist() for b, _ in results] == [b.tolist() for b in batches]
    order = np.concatenate(batches)
    got = np.concatenate([outputs[name] for _, outputs in results])
    assert_rows_close(got, rows_of(reference[name], order, name), precision, name)
