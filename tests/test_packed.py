import numpy as np
import pytest
import torch

from conftest import AMINO, fair_esm_mean, fair_esm_outputs, spec_for, split_rows
from esmshard.batching import planned_batches
from esmshard.engine import PackedEngine, Packer, ReferenceEngine
from esmshard.model import load_model, write_random_checkpoint
from esmshard.outputs import POOLINGS, OutputSpec

LENGTHS = (300, 1, 2, 50, 1022, 3000, 77, 2)


def random_residues(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [np.frombuffer("".join(rng.choice(list(AMINO), size=n)).encode(), np.uint8) for n in lengths]


@pytest.fixture(scope="module")
def wider(tmp_path_factory):
    """4 layers, width 64, 4 heads of 16: more room for a wrong index to show than the tiny model."""
    return load_model(str(write_random_checkpoint(tmp_path_factory.mktemp("m") / "esm2_w64.pt", 4, 64, 4, seed=3)))


def test_packed_cpu_float32_equals_fair_esm(wider):
    """Every output, of layers 0, mid and last at once, in one mixed batch: max abs diff <= 1e-4."""
    network, alphabet = wider
    engine = PackedEngine(
        network, alphabet, "cpu", "float32", spec_for(network, (-1, 2, 0), ("mean", "bos", "per_residue"))
    )
    residues = random_residues(LENGTHS)
    embedded = engine.embed(residues)
    lengths = [min(len(r), 1022) for r in residues]
    for layer in (0, 2, 4):
        per_residue = split_rows(embedded[f"per_residue/layer_{layer}"], lengths)
        for i, r in enumerate(residues):
            expected = fair_esm_outputs(network, alphabet, r.tobytes().decode(), layer)
            assert np.abs(embedded[f"mean/layer_{layer}"][i] - expected["mean"]).max() <= 1e-4, len(r)
            assert np.abs(embedded[f"bos/layer_{layer}"][i] - expected["bos"]).max() <= 1e-4, len(r)
            assert np.abs(per_residue[i] - expected["per_residue"]).max() <= 1e-4, len(r)


def test_packed_with_the_tiny_model(tiny_checkpoint):
    network, alphabet = load_model(str(tiny_checkpoint))
    engine = PackedEngine(network, alphabet, "cpu", "float32", spec_for(network))
    residues = random_residues(LENGTHS, seed=1)
    for r, vector in zip(residues, engine.embed(residues)["mean/layer_2"]):
        assert np.abs(vector - fair_esm_mean(network, alphabet, r.tobytes().decode(), 2)).max() <= 1e-4


def test_pack_makes_one_stream_with_restarting_positions(tiny_checkpoint):
    network, alphabet = load_model(str(tiny_checkpoint))
    batch = Packer(alphabet, spec_for(network)).pack(
        [np.frombuffer(b"MKV", np.uint8), np.frombuffer(b"W" * 1030, np.uint8)]
    )
    assert batch.cu_seqlens.tolist() == [0, 5, 5 + 1024]
    assert batch.max_len == 1024
    assert batch.tokens[:5].tolist() == [alphabet.cls_idx] + [alphabet.get_idx(c) for c in "MKV"] + [alphabet.eos_idx]
    assert batch.positions[:7].tolist() == [0, 1, 2, 3, 4, 0, 1]
    assert batch.residue_tokens[:4].tolist() == [1, 2, 3, 6] and batch.residue_seq[:4].tolist() == [0, 0, 0, 1]
    assert np.allclose(batch.mean_weight[:4].numpy(), [1 / 3, 1 / 3, 1 / 3, 1 / 1022])
    assert batch.mean_weight.sum().item() == pytest.approx(2.0)
    assert batch.residue_rows_out == 3 + 1022 and batch.bos_tokens.tolist() == [0, 5]


def test_windows_cover_a_long_protein_and_average_where_they_overlap(tiny_checkpoint):
    network, alphabet = load_model(str(tiny_checkpoint))
    spec = spec_for(network, long_sequences="window")
    windows = spec.windows(2500)
    assert len(windows) == 4 and windows[0] == (0, 1022) and windows[-1] == (1478, 2500)
    assert all(
        end - start == 1022 and next_start <= end - 512 for (start, end), (next_start, _) in zip(windows, windows[1:])
    )
    batch = Packer(alphabet, spec).pack([np.frombuffer(b"A" * 2500, np.uint8), np.frombuffer(b"MK", np.uint8)])
    assert batch.cu_seqlens.tolist() == [1024 * k for k in range(5)] + [4096 + 4]
    assert batch.residue_rows_out == 2502
    coverage = np.bincount(batch.residue_rows.numpy(), minlength=2502)
    assert coverage.min() == 1 and np.allclose(batch.residue_weight.numpy(), 1 / coverage[batch.residue_rows.numpy()])
    assert batch.mean_weight[batch.residue_seq == 0].sum().item() == pytest.approx(1.0)
    assert np.allclose(batch.bos_weight.numpy(), [0.25] * 4 + [1])


def test_a_window_of_a_long_protein_is_a_single_pass_where_context_suffices(tiny_checkpoint):
    """With attention that cannot carry information between positions (v and out projections
    zero), the model works position by position: every residue's context suffices, and the
    windowed per-residue vectors of a 2,500-residue protein must equal one pass over all of it."""
    network, alphabet = load_model(str(tiny_checkpoint))
    with torch.no_grad():
        for layer in network.layers:
            layer.self_attn.v_proj.weight.zero_()
            layer.self_attn.out_proj.weight.zero_()
    protein = random_residues((2500,), seed=5)[0]
    per_residue_mean = spec_for(network, poolings=("mean", "per_residue"), long_sequences="window")
    windowed = PackedEngine(network, alphabet, "cpu", "float32", per_residue_mean).embed([protein])
    single_pass = PackedEngine(network, alphabet, "cpu", "float32", per_residue_mean).model
    tokens = Packer(alphabet, per_residue_mean).table[protein]
    tokens = torch.tensor([alphabet.cls_idx, *tokens, alphabet.eos_idx])
    with torch.inference_mode():
        ((_, hidden),) = single_pass.hidden_states(
            tokens, torch.arange(len(tokens)), torch.tensor([0, len(tokens)], dtype=torch.int32), len(tokens), (2,)
        )
    assert windowed["per_residue/layer_2"].shape == (2500, 32)
    assert np.abs(windowed["per_residue/layer_2"] - hidden[1:-1].numpy()).max() <= 1e-5
    # the mean is over the whole protein (float32 sums of 2,500 rows: the CPU tolerance of 1e-4)
    assert (
        np.abs(windowed["mean/layer_2"][0] - windowed["per_residue/layer_2"].astype(np.float64).mean(0)).max() <= 1e-4
    )


def test_windows_with_real_attention_equal_each_window_where_only_it_covers(tiny_checkpoint):
    network, alphabet = load_model(str(tiny_checkpoint))
    spec = spec_for(network, poolings=("per_residue", "bos"), long_sequences="window")
    protein = random_residues((2500,), seed=6)[0]
    engine = PackedEngine(network, alphabet, "cpu", "float32", spec)
    windowed = engine.embed([protein])
    plain = PackedEngine(network, alphabet, "cpu", "float32", spec_for(network, poolings=("per_residue", "bos")))
    windows = spec.windows(2500)
    alone = [plain.embed([protein[start:end]]) for start, end in windows]
    total, coverage = np.zeros((2500, 32)), np.zeros(2500)
    for (start, end), single in zip(windows, alone):
        total[start:end] += single["per_residue/layer_2"]
        coverage[start:end] += 1
    assert set(coverage) == {1, 2, 3}
    assert np.abs(windowed["per_residue/layer_2"] - total / coverage[:, None]).max() <= 1e-5
    only_first = windows[1][0]  # residues only the first window covers: exactly its own pass
    assert np.array_equal(windowed["per_residue/layer_2"][:only_first], alone[0]["per_residue/layer_2"][:only_first])
    assert np.abs(windowed["bos/layer_2"][0] - np.mean([a["bos/layer_2"][0] for a in alone], axis=0)).max() <= 1e-5


def test_reference_and_packed_engines_agree_on_windows(tiny_checkpoint):
    network, alphabet = load_model(str(tiny_checkpoint))
    spec = spec_for(network, (-1, 0), ("mean", "bos", "per_residue"), long_sequences="window")
    residues = random_residues((2500, 40, 1100), seed=8)
    packed = PackedEngine(network, alphabet, "cpu", "float32", spec).embed(residues)
    reference = ReferenceEngine(network, alphabet, "cpu", "float32", spec).embed(residues)
    for name in spec.names:
        assert np.abs(packed[name] - reference[name]).max() <= 1e-4, name


def test_out_of_memory_halves_the_batch_until_it_fits(tiny_checkpoint, monkeypatch):
    network, alphabet = load_model(str(tiny_checkpoint))
    engine = PackedEngine(network, alphabet, "cpu", "float32", spec_for(network, poolings=("mean", "per_residue")))
    residues = random_residues((40, 30, 300, 5, 90, 60, 7, 200), seed=2)
    expected = engine.embed(residues)
    real_outputs = engine.outputs
    tried = []

    def outputs_with_small_memory(batch, model=None):
        tried.append(len(batch.tokens))
        if len(batch.tokens) > 310:
            raise torch.OutOfMemoryError("simulated")
        return real_outputs(batch, model)

    monkeypatch.setattr(engine, "outputs", outputs_with_small_memory)
    split = engine.embed(residues)
    for name in expected:
        assert np.allclose(split[name], expected[name], atol=1e-6)
    # halved by tokens until each part fits: 748 -> 74 + 674, 674 -> 309 + 365, 365 -> 163 + 202
    assert tried == [748, 74, 674, 309, 365, 163, 202] and engine.splits == 3

    tried.clear()
    with pytest.raises(torch.OutOfMemoryError):  # one sequence that never fits is an error
        engine.embed(random_residues((400,)))


def test_embed_batches_yields_every_batch_in_order(tiny_checkpoint):
    network, alphabet = load_model(str(tiny_checkpoint))
    engine = PackedEngine(network, alphabet, "cpu", "float32", spec_for(network, poolings=("mean", "per_residue")))
    residues = random_residues((5, 50, 500, 20, 1100), seed=4)
    batches = [np.array([2, 0]), np.array([4]), np.array([1, 3])]
    out = list(engine.embed_batches(batches, lambda batch: [residues[i] for i in batch]))
    assert [b.tolist() for b, _ in out] == [b.tolist() for b in batches]
    everything = engine.embed(residues)
    lengths = [min(len(r), 1022) for r in residues]
    per_residue = split_rows(everything["per_residue/layer_2"], lengths)
    for batch, outputs in out:
        assert np.allclose(outputs["mean/layer_2"], everything["mean/layer_2"][batch], atol=1e-6)
        assert np.allclose(outputs["per_residue/layer_2"], np.concatenate([per_residue[i] for i in batch]), atol=1e-6)


def test_a_batch_that_overflows_float16_is_computed_again_in_bfloat16(tmp_path):
    """Scaled feed-forward weights push one layer's activations past float16's 65504: the float16
    engine must give the bfloat16 engine's finite vectors for that batch, and count it."""
    network, alphabet = load_model(str(write_random_checkpoint(tmp_path / "esm2_w64.pt", 4, 64, 4, seed=3)))
    with torch.no_grad():
        network.layers[1].fc1.weight.mul_(300.0)
        network.layers[1].fc2.weight.mul_(300.0)
    spec = spec_for(network, (-1, 1), ("mean", "per_residue"))
    residues = random_residues((300, 1, 50, 77), seed=5)
    bfloat16 = PackedEngine(network, alphabet, "cpu", "bfloat16", spec).embed(residues)
    float32 = PackedEngine(network, alphabet, "cpu", "float32", spec).embed(residues)
    assert all(np.isfinite(v).all() for v in bfloat16.values())
    engine = PackedEngine(network, alphabet, "cpu", "float16", spec)
    with torch.inference_mode():  # the unguarded float16 forward really overflows
        hidden = dict(engine.model.hidden_states(*_stream(engine, residues), [2]))[2]
    assert not torch.isfinite(hidden).all()
    batches = [np.array([0, 1]), np.array([2, 3])]
    out = dict((tuple(b), o) for b, o in engine.embed_batches(batches, lambda b: [residues[i] for i in b]))
    assert engine.fallbacks == 2
    for name in bfloat16:
        got = np.concatenate([out[(0, 1)][name], out[(2, 3)][name]])
        assert np.array_equal(got, bfloat16[name]), name
        assert np.isfinite(got).all() and not np.array_equal(got, float32[name])


def test_float16_without_overflow_needs_no_fallback(wider):
    network, alphabet = wider
    spec = spec_for(network, (-1,), ("mean",))
    residues = random_residues((300, 1, 50, 77), seed=5)
    engine = PackedEngine(network, alphabet, "cpu", "float16", spec)
    got = engine.embed(residues)["mean/layer_4"]
    want = PackedEngine(network, alphabet, "cpu", "float32", spec).embed(residues)["mean/layer_4"]
    assert engine.fallbacks == 0 and engine._fallback_model is None
    assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()


def _stream(engine, residues):
    packed = engine.packer.pack(residues)
    return packed.tokens, packed.positions, packed.cu_seqlens, packed.max_len


def test_outputs_come_in_the_stored_dtype_rounded_as_numpy_rounds(wider):
    """dtype float16 is cast on the device: the same numbers as casting the float32 outputs after."""
    network, alphabet = wider
    spec = spec_for(network, (-1, 2), ("mean", "bos", "per_residue"))
    residues = random_residues(LENGTHS, seed=2)
    want = PackedEngine(network, alphabet, "cpu", "float32", spec).embed(residues)
    for engine in (
        PackedEngine(network, alphabet, "cpu", "float32", spec, stored="float16"),
        ReferenceEngine(network, alphabet, "cpu", "float32", spec, stored="float16"),
    ):
        got = engine.embed(residues)
        for name, values in want.items():
            assert got[name].dtype == np.float16 and got[name].shape == values.shape, name
            assert np.abs(got[name].astype(np.float32) - values).max() <= 1e-3 * np.abs(values).max(), name
        if isinstance(engine, PackedEngine):
            assert all(np.array_equal(got[name], values.astype(np.float16)) for name, values in want.items())


def _by_sequence(results, spec, lengths):
    """{name: per sequence rows} from embed_batches' (batch, outputs), whatever the batches."""
    embedded = spec.embedded_lengths(lengths)
    got = {name: [None] * len(lengths) for name in spec.names}
    for batch, outputs in results:
        for name, rows in outputs.items():
            pieces = split_rows(rows, embedded[batch]) if name.startswith("per_residue") else rows[:, None]
            for i, piece in zip(np.asarray(batch).tolist(), pieces):
                got[name][i] = piece
    return got


# Windows that overlap by more than half (900) once: the windows are the output spec's, whichever engine.
@pytest.mark.parametrize("kind, overlap", [(PackedEngine, 512), (PackedEngine, 900), (ReferenceEngine, 512)])
def test_a_protein_split_over_batches_equals_it_unsplit(tiny_checkpoint, kind, overlap):
    """A 3,000-residue protein's windows (5 or 18 of them) spread over batches of at most 4096
    tokens, among short and other windowed proteins: every output as with one batch for all.
    The mean of one batch for all sums 5k-18k rows in float32, up to 2e-5 off the float64 mean of
    its rows; summed over batches it is closer: each is held to that float64 mean."""
    network, alphabet = load_model(str(tiny_checkpoint))
    spec = OutputSpec.resolve((-1, 0), POOLINGS, network.num_layers, "window", overlap, max_residues=1022)
    lengths = np.array([40, 3000, 3, 1100, 700, 2500])
    residues = random_residues(lengths, seed=9)
    padded = kind is ReferenceEngine
    engine = kind(network, alphabet, "cpu", "float32", spec)
    whole = planned_batches(lengths, spec, 10**6, padded)
    split = planned_batches(lengths, spec, 4096, padded)
    assert len(whole) == 1 and len(split) > spec.window_counts([3000])[0] // 4
    read = lambda batch: [residues[i] for i in batch]  # noqa: E731
    want = _by_sequence(engine.embed_batches(whole, read), spec, lengths)
    results = list(engine.embed_batches(split, read))
    assert sorted(np.concatenate([b for b, _ in results]).tolist()) == list(range(len(lengths)))
    got = _by_sequence(results, spec, lengths)
    for name in spec.names:
        for i in range(len(lengths)):
            assert got[name][i].shape == want[name][i].shape
            if name.startswith("mean"):
                exact = want[name.replace("mean", "per_residue")][i].astype(np.float64).mean(0)
                assert np.abs(got[name][i][0] - exact).max() <= 1e-5, (name, lengths[i])
                assert np.abs(want[name][i][0] - exact).max() <= 1e-4, (name, lengths[i])
            else:
                assert np.abs(got[name][i] - want[name][i]).max() <= 1e-5, (name, lengths[i])
    # float16 storage: the float32 sums, cast once at the end
    stored = kind(network, alphabet, "cpu", "float32", spec, stored="float16")
    half = _by_sequence(stored.embed_batches(split, read), spec, lengths)
    for name in spec.names:
        for i in range(len(lengths)):
            assert half[name][i].dtype == np.float16 and np.array_equal(half[name][i], got[name][i].astype(np.float16))


def test_out_of_memory_halves_a_lone_protein_by_its_windows(tiny_checkpoint, monkeypatch):
    network, alphabet = load_model(str(tiny_checkpoint))
    spec = spec_for(network, poolings=POOLINGS, long_sequences="window")
    engine = PackedEngine(network, alphabet, "cpu", "float32", spec)
    residues = random_residues((3000, 20), seed=10)
    expected = engine.embed(residues)
    real_outputs = engine.outputs
    tried = []

    def outputs_with_small_memory(batch, model=None):
        tried.append(len(batch.tokens))
        if len(batch.tokens) > 2100:
            raise torch.OutOfMemoryError("simulated")
        return real_outputs(batch, model)

    monkeypatch.setattr(engine, "outputs", outputs_with_small_memory)
    for batches in ([np.arange(2)], planned_batches([3000, 20], spec, 4096)):
        got = _by_sequence(engine.embed_batches(batches, lambda b: [residues[i] for i in b]), spec, [3000, 20])
        for name in spec.names:
            assert np.abs(np.concatenate(got[name]) - expected[name]).max() <= 1e-5, name
    # 5 windows and 20 residues: 5142 -> 5120 + 22, 5120 -> 2048 + 3072, 3072 -> 1024 + 2048;
    # planned as 4 windows, then 1 with the 20 residues: 4096 -> 2048 + 2048
    assert tried == [5142, 5120, 2048, 3072, 1024, 2048, 22, 4096, 2048, 2048, 1046] and engine.splits == 3 + 1

    with pytest.raises(torch.OutOfMemoryError):  # one window that never fits is an error
        monkeypatch.setattr(
            engine, "outputs", lambda batch, model=None: (_ for _ in ()).throw(torch.OutOfMemoryError())
        )
        engine.embed(random_residues((3000,)))


def test_a_split_protein_that_overflows_float16_is_computed_again_in_bfloat16(tmp_path):
    network, alphabet = load_model(str(write_random_checkpoint(tmp_path / "esm2_w64.pt", 4, 64, 4, seed=3)))
    with torch.no_grad():
        network.layers[1].fc1.weight.mul_(300.0)
        network.layers[1].fc2.weight.mul_(300.0)
    spec = spec_for(network, (-1, 1), ("mean", "bos", "per_residue"), long_sequences="window")
    lengths = [2500]
    residues = random_residues(lengths, seed=11)
    batches = planned_batches(lengths, spec, 2048)
    assert len(batches) == 2
    read = lambda b: [residues[i] for i in b]  # noqa: E731
    bfloat16 = _by_sequence(
        PackedEngine(network, alphabet, "cpu", "bfloat16", spec).embed_batches(batches, read), spec, lengths
    )
    engine = PackedEngine(network, alphabet, "cpu", "float16", spec)
    got = _by_sequence(engine.embed_batches(batches, read), spec, lengths)
    assert engine.fallbacks == 2
    for name in spec.names:
        for i in range(len(lengths)):
            assert np.isfinite(got[name][i]).all() and np.array_equal(got[name][i], bfloat16[name][i]), name
