"""The store's segments as shards see them: rows referred to in place, or copied."""

import h5py
import numpy as np
import pytest

from esmshard import store as store_module
from esmshard.outputs import OutputSpec
from esmshard.shard import ShardWriter, shard_problem
from esmshard.store import SegmentWriter, Store, sequence_keys, settings_identity

SPEC = OutputSpec.resolve([-1], ["mean", "per_residue"], 2, max_residues=1022)
IDENTITY = settings_identity("model-digest", "esm2", SPEC, "float16", "packed")
LENGTHS = np.array([5, 1, 30, 7, 12, 1030, 3, 9])
DIGESTS = np.array([bytes([i]) * 16 for i in range(len(LENGTHS))], dtype="V16")
IDS = np.array([f"p{i}" for i in range(len(LENGTHS))], dtype=object)


def outputs_of(rows: np.ndarray) -> dict:
    """Values that say which sequence (and residue) they belong to."""
    embedded = SPEC.embedded_lengths(LENGTHS[rows])
    per_residue = np.concatenate([np.full((n, 4), 100 * r) + np.arange(n)[:, None] for r, n in zip(rows, embedded)])
    return {
        "mean/layer_2": np.repeat(rows[:, None], 4, 1).astype(np.float16),
        "per_residue/layer_2": per_residue.astype(np.float16),
    }


@pytest.fixture
def filled(tmp_path):
    """A store of three segments, each of consecutive sequences in order, as a rank writes them."""
    store = Store(tmp_path / "store", IDENTITY, SPEC, 4, "float16")
    writer = SegmentWriter(store)
    for rows in (np.arange(0, 3), np.arange(3, 6), np.arange(6, 8)):
        writer.submit(lambda rows=rows: (DIGESTS[rows], LENGTHS[rows], outputs_of(rows)))
    writer.wait()
    return Store(tmp_path / "store", IDENTITY, SPEC, 4, "float16")


def assemble(store: Store, path, runs) -> dict:
    path.parent.mkdir(exist_ok=True)
    writer = ShardWriter(path, IDS, LENGTHS, SPEC, 4, "float16", {"rank": 0}, runs)
    store.copy_to(writer, DIGESTS)
    writer.close()
    assert shard_problem(path, IDS, {"rank": 0}) is None
    with h5py.File(path) as h5:
        return {name: (h5[name][:], h5[name].is_virtual) for name in SPEC.names}


def test_a_shard_refers_to_rows_in_order_in_place_and_reads_as_a_copied_one(filled, tmp_path):
    runs = filled.residue_runs(DIGESTS)
    assert [(start, end) for _, _, start, end in runs] == [(0, 36), (0, 1041), (0, 12)]  # one run per segment
    virtual = assemble(filled, tmp_path / "shards/virtual.h5", runs)
    copied = assemble(filled, tmp_path / "shards/copied.h5", None)
    want = outputs_of(np.arange(len(LENGTHS)))
    for name in SPEC.names:
        assert np.array_equal(virtual[name][0], want[name]) and np.array_equal(copied[name][0], want[name])
    assert virtual["per_residue/layer_2"][1] and not copied["per_residue/layer_2"][1]
    assert not virtual["mean/layer_2"][1]


def test_rows_out_of_order_take_more_runs_and_too_many_are_copied(filled, monkeypatch):
    order = np.array([0, 5, 1, 2, 7, 3, 4, 6])
    runs = filled.residue_runs(DIGESTS[order])
    assert [run[2:] for run in runs] == [(0, 5), (19, 1041), (5, 36), (3, 12), (0, 19), (0, 3)]  # 1, 2 and 3, 4 adjoin
    monkeypatch.setattr(store_module, "MAX_VIRTUAL_RUNS", 5)
    assert filled.residue_runs(DIGESTS[order]) is None


def test_a_shard_whose_segment_is_gone_says_so(filled, tmp_path):
    path = tmp_path / "shards/virtual.h5"
    assemble(filled, path, filled.residue_runs(DIGESTS))
    filled.segments[1].unlink()
    problem = shard_problem(path, IDS, {"rank": 0}, {"per_residue/layer_2": (36 + 1041 + 12, 4)})
    assert (
        problem == f"refers to 1 store segment(s) that no longer exist (e.g. ../store/{filled.directory.name}/"
        f"{filled.segments[1].name})"
    )


def test_a_failed_background_write_is_raised_to_the_rank(tmp_path):
    writer = SegmentWriter(Store(tmp_path / "store", IDENTITY, SPEC, 4, "float16"))

    def broken():
        raise OSError("disk on fire")

    writer.submit(broken)
    with pytest.raises(OSError, match="disk on fire"):
        writer.wait()
    writer.wait()  # raised once


def test_other_long_protein_handling_reuses_the_other_sequences_as_they_are(tmp_path):
    """A segment written truncating long proteins, read by a run that windows them: the same store
    directory, the short sequences found with their own rows (after a truncated protein's 1,022),
    the long protein not (its key carries how it is embedded), and nothing deleted."""
    truncating = Store(tmp_path / "store", IDENTITY, SPEC, 4, "float16")
    rows = np.array([5, 6, 7])  # the 1,030-residue protein first
    keys = sequence_keys(DIGESTS, LENGTHS, SPEC)
    truncating.write(keys[rows], LENGTHS[rows], outputs_of(rows))
    window = OutputSpec.resolve([-1], ["mean", "per_residue"], 2, "window", 256, max_residues=1022)
    windowing = Store(
        tmp_path / "store", settings_identity("model-digest", "esm2", window, "float16", "packed"), window, 4, "float16"
    )
    assert windowing.directory == truncating.directory and len(windowing.segments) == 1
    window_keys = sequence_keys(DIGESTS, LENGTHS, window)
    assert (window_keys[LENGTHS <= 1022] == keys[LENGTHS <= 1022]).all() and window_keys[5] != keys[5]
    assert windowing.find(window_keys[rows])[0].tolist() == [-1, 0, 0]
    short = np.array([6, 7])
    path = tmp_path / "shard.h5"
    writer = ShardWriter(path, IDS[short], LENGTHS[short], window, 4, "float16", {"rank": 0}, None)
    windowing.copy_to(writer, window_keys[short])
    writer.close()
    with h5py.File(path) as h5:
        for name, want in outputs_of(short).items():
            assert np.array_equal(h5[name][:], want), name
