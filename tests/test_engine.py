import numpy as np
import pytest
import torch

from conftest import AMINO
from esmshard.engine import ReferenceEngine, resolve_layer
from esmshard.model import load_model


def fair_esm_mean(network, alphabet, sequence: str, layer: int) -> np.ndarray:
    """What fair-esm's scripts/extract.py --include mean writes for one sequence, unbatched."""
    _, _, tokens = alphabet.get_batch_converter(truncation_seq_length=1022)([("x", sequence)])
    with torch.no_grad():
        representation = network(tokens, repr_layers=[layer])["representations"][layer]
    return representation[0, 1 : min(len(sequence), 1022) + 1].mean(0).numpy()


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return load_model(str(tiny_checkpoint))


@pytest.mark.parametrize("layer", [-1, 1, 0])
def test_mixed_batch_equals_fair_esm_per_sequence(tiny, layer):
    network, alphabet = tiny
    rng = np.random.default_rng(7)
    sequences = ["".join(rng.choice(list(AMINO), size=n)) for n in (300, 1, 2, 50, 1022, 3000, 77)]
    engine = ReferenceEngine(network, alphabet, "cpu", "float32", layer)
    embedded = engine.embed(sequences)
    assert embedded.shape == (len(sequences), 32) and embedded.dtype == np.float32
    for sequence, vector in zip(sequences, embedded):
        expected = fair_esm_mean(network, alphabet, sequence, engine.layer)
        assert np.abs(vector - expected).max() <= 1e-5, len(sequence)


def test_truncation_keeps_the_first_1022_residues(tiny):
    network, alphabet = tiny
    engine = ReferenceEngine(network, alphabet, "cpu", "float32", -1)
    long = "".join(np.random.default_rng(1).choice(list(AMINO), size=1500))
    a, b = engine.embed([long, long[:1022]])
    assert np.array_equal(a, b)


@pytest.mark.parametrize("layer, resolved", [(-1, 33), (-33, 1), (-34, 0), (0, 0), (33, 33), (12, 12)])
def test_layer_numbers(layer, resolved):
    assert resolve_layer(layer, 33) == resolved


@pytest.mark.parametrize("layer", [34, -35])
def test_layer_out_of_range(layer):
    with pytest.raises(ValueError, match="outside this model's layers 0..33"):
        resolve_layer(layer, 33)
