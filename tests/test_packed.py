import numpy as np
import pytest
import torch

from conftest import AMINO
from esmshard.engine import PackedEngine, Tokenizer
from esmshard.model import load_model, write_random_checkpoint
from test_engine import fair_esm_mean

LENGTHS = (300, 1, 2, 50, 1022, 3000, 77, 2)


def random_residues(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [np.frombuffer("".join(rng.choice(list(AMINO), size=n)).encode(), np.uint8) for n in lengths]


@pytest.fixture(scope="module")
def wider(tmp_path_factory):
    """4 layers, width 64, 4 heads of 16: more room for a wrong index to show than the tiny model."""
    return load_model(str(write_random_checkpoint(tmp_path_factory.mktemp("m") / "esm2_w64.pt", 4, 64, 4, seed=3)))


@pytest.mark.parametrize("layer", [-1, 2, 0])
def test_packed_cpu_float32_equals_fair_esm(wider, layer):
    network, alphabet = wider
    engine = PackedEngine(network, alphabet, "cpu", "float32", layer)
    residues = random_residues(LENGTHS)
    embedded = engine.embed(residues)
    for r, vector in zip(residues, embedded):
        expected = fair_esm_mean(network, alphabet, r.tobytes().decode(), engine.layer)
        assert np.abs(vector - expected).max() <= 1e-4, len(r)


def test_packed_with_the_tiny_model(tiny_checkpoint):
    network, alphabet = load_model(str(tiny_checkpoint))
    engine = PackedEngine(network, alphabet, "cpu", "float32", -1)
    residues = random_residues(LENGTHS, seed=1)
    for r, vector in zip(residues, engine.embed(residues)):
        assert np.abs(vector - fair_esm_mean(network, alphabet, r.tobytes().decode(), 2)).max() <= 1e-4


def test_compiled_layers_match_and_compile_once(wider):
    torch._dynamo.reset()
    network, alphabet = wider
    eager = PackedEngine(network, alphabet, "cpu", "float32", -1)
    compiled = PackedEngine(network, alphabet, "cpu", "float32", -1, compile=True)
    for seed, lengths in enumerate([(300, 1, 2, 50), (1022, 3000), (7, 8, 9, 10, 11)]):
        residues = random_residues(lengths, seed=seed)
        assert np.abs(compiled.embed(residues) - eager.embed(residues)).max() <= 1e-5
    # one graph per half-layer serves all 4 layers and every batch size
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


def test_pack_makes_one_stream_with_restarting_positions(tiny_checkpoint):
    _, alphabet = load_model(str(tiny_checkpoint))
    batch = Tokenizer(alphabet).pack([np.frombuffer(b"MKV", np.uint8), np.frombuffer(b"W" * 1030, np.uint8)])
    assert batch.cu_seqlens.tolist() == [0, 5, 5 + 1024]
    assert batch.max_len == 1024
    assert batch.tokens[:5].tolist() == [alphabet.cls_idx] + [alphabet.get_idx(c) for c in "MKV"] + [alphabet.eos_idx]
    assert batch.positions[:7].tolist() == [0, 1, 2, 3, 4, 0, 1]
    assert batch.seq_index.tolist() == [0] * 5 + [1] * 1024
    assert np.allclose(batch.pool_weight[:5].numpy(), [0, 1 / 3, 1 / 3, 1 / 3, 0])
    assert batch.pool_weight.sum().item() == pytest.approx(2.0)


def test_out_of_memory_halves_the_batch_until_it_fits(tiny_checkpoint, monkeypatch):
    network, alphabet = load_model(str(tiny_checkpoint))
    engine = PackedEngine(network, alphabet, "cpu", "float32", -1)
    residues = random_residues((40, 30, 300, 5, 90, 60, 7, 200), seed=2)
    expected = engine.embed(residues)
    real_pooled = engine.pooled
    tried = []

    def pooled_with_small_memory(batch):
        tried.append(len(batch.tokens))
        if len(batch.tokens) > 310:
            raise torch.OutOfMemoryError("simulated")
        return real_pooled(batch)

    monkeypatch.setattr(engine, "pooled", pooled_with_small_memory)
    assert np.allclose(engine.embed(residues), expected, atol=1e-6)
    assert tried[0] == sum(len(r) + 2 for r in residues) and max(tried[1:]) <= 700

    tried.clear()
    with pytest.raises(torch.OutOfMemoryError):  # one sequence that never fits is an error
        engine.embed(random_residues((400,)))


def test_embed_batches_yields_every_batch_in_order(tiny_checkpoint):
    network, alphabet = load_model(str(tiny_checkpoint))
    engine = PackedEngine(network, alphabet, "cpu", "float32", -1)
    residues = random_residues((5, 50, 500, 20, 1100), seed=4)
    batches = [np.array([2, 0]), np.array([4]), np.array([1, 3])]
    out = list(engine.embed_batches(batches, lambda batch: [residues[i] for i in batch]))
    assert [b.tolist() for b, _ in out] == [b.tolist() for b in batches]
    everything = engine.embed(residues)
    for batch, vectors in out:
        assert np.allclose(vectors, everything[batch], atol=1e-6)
