import numpy as np
import pytest

from conftest import AMINO, fair_esm_outputs, residues_of, spec_for, split_rows
from esmshard.engine import ReferenceEngine
from esmshard.model import load_model
from esmshard.outputs import resolve_layer


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return load_model(str(tiny_checkpoint))


def test_every_output_of_a_mixed_batch_equals_fair_esm_per_sequence(tiny):
    network, alphabet = tiny
    rng = np.random.default_rng(7)
    sequences = ["".join(rng.choice(list(AMINO), size=n)) for n in (300, 1, 2, 50, 1022, 3000, 77)]
    spec = spec_for(network, (-1, 1, 0), ("mean", "bos", "per_residue"))
    engine = ReferenceEngine(network, alphabet, "cpu", "float32", spec)
    embedded = engine.embed(residues_of(sequences))
    names = [f"{pooling}/layer_{layer}" for pooling in ("mean", "bos", "per_residue") for layer in (0, 1, 2)]
    assert sorted(embedded) == sorted(names)
    lengths = [min(len(s), 1022) for s in sequences]
    for layer in (0, 1, 2):
        assert embedded[f"mean/layer_{layer}"].shape == (len(sequences), 32)
        assert embedded[f"per_residue/layer_{layer}"].shape == (sum(lengths), 32)
        per_residue = split_rows(embedded[f"per_residue/layer_{layer}"], lengths)
        for i, sequence in enumerate(sequences):
            expected = fair_esm_outputs(network, alphabet, sequence, layer)
            assert np.abs(embedded[f"mean/layer_{layer}"][i] - expected["mean"]).max() <= 1e-5, len(sequence)
            assert np.abs(embedded[f"bos/layer_{layer}"][i] - expected["bos"]).max() <= 1e-5, len(sequence)
            assert np.abs(per_residue[i] - expected["per_residue"]).max() <= 1e-5, len(sequence)


def test_truncation_embeds_the_first_1022_residues_as_fair_esm_does(tiny):
    network, alphabet = tiny
    engine = ReferenceEngine(network, alphabet, "cpu", "float32", spec_for(network, poolings=("mean", "per_residue")))
    long = "".join(np.random.default_rng(1).choice(list(AMINO), size=1500))
    embedded = engine.embed(residues_of([long]))
    expected = fair_esm_outputs(network, alphabet, long[:1022], 2)
    assert embedded["per_residue/layer_2"].shape == (1022, 32)
    assert np.abs(embedded["mean/layer_2"][0] - expected["mean"]).max() <= 1e-5
    assert np.abs(embedded["per_residue/layer_2"] - expected["per_residue"]).max() <= 1e-5


@pytest.mark.parametrize("layer, resolved", [(-1, 33), (-33, 1), (-34, 0), (0, 0), (33, 33), (12, 12)])
def test_layer_numbers(layer, resolved):
    assert resolve_layer(layer, 33) == resolved


@pytest.mark.parametrize("layer", [34, -35])
def test_layer_out_of_range(layer):
    with pytest.raises(ValueError, match="outside this model's layers 0..33"):
        resolve_layer(layer, 33)
