import numpy as np
import pytest
import torch

from conftest import AMINO
from esmshard.engine import ReferenceEngine
from esmshard.model import load_model
from esmshard.outputs import OutputSpec, resolve_layer


def fair_esm_outputs(network, alphabet, sequence: str, layer: int) -> dict[str, np.ndarray]:
    """What fair-esm's scripts/extract.py --include mean bos per_tok writes for one sequence, unbatched."""
    _, _, tokens = alphabet.get_batch_converter(truncation_seq_length=1022)([("x", sequence)])
    with torch.no_grad():
        representation = network(tokens, repr_layers=[layer])["representations"][layer][0]
    per_residue = representation[1 : min(len(sequence), 1022) + 1].numpy()
    return {"mean": per_residue.mean(0), "bos": representation[0].numpy(), "per_residue": per_residue}


def fair_esm_mean(network, alphabet, sequence: str, layer: int) -> np.ndarray:
    return fair_esm_outputs(network, alphabet, sequence, layer)["mean"]


def spec_for(network, layers=(-1,), poolings=("mean",), long_sequences="truncate") -> OutputSpec:
    return OutputSpec.resolve(layers, poolings, network.num_layers, long_sequences)


def residues_of(sequences: list[str]) -> list[np.ndarray]:
    return [np.frombuffer(s.encode(), np.uint8) for s in sequences]


def split_rows(per_residue: np.ndarray, lengths) -> list[np.ndarray]:
    return np.split(per_residue, np.cumsum(lengths)[:-1])


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
    assert sorted(embedded) == sorted(f"{p}/layer_{l}" for p in ("mean", "bos", "per_residue") for l in (0, 1, 2))
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


def test_truncation_keeps_the_first_1022_residues(tiny):
    network, alphabet = tiny
    engine = ReferenceEngine(network, alphabet, "cpu", "float32", spec_for(network))
    long = "".join(np.random.default_rng(1).choice(list(AMINO), size=1500))
    a, b = engine.embed(residues_of([long, long[:1022]]))["mean/layer_2"]
    assert np.array_equal(a, b)


@pytest.mark.parametrize("layer, resolved", [(-1, 33), (-33, 1), (-34, 0), (0, 0), (33, 33), (12, 12)])
def test_layer_numbers(layer, resolved):
    assert resolve_layer(layer, 33) == resolved


@pytest.mark.parametrize("layer", [34, -35])
def test_layer_out_of_range(layer):
    with pytest.raises(ValueError, match="outside this model's layers 0..33"):
        resolve_layer(layer, 33)
