import h5py
import numpy as np
import pytest

from esmshard.outputs import OutputSpec
from esmshard.shard import ShardWriter, dataset_shapes, shard_problem

IDS = np.array(["a", "b", "c"], dtype=object)
LENGTHS = np.array([5, 6, 1030])
SPEC = OutputSpec.resolve([-1], ["mean", "per_residue"], 2, max_residues=1022)
SHAPES = dataset_shapes(SPEC, LENGTHS, 4)


def write_shard(path, ids=IDS, dim=4):
    writer = ShardWriter(path, ids, LENGTHS[: len(ids)], SPEC, dim, "float32", {"fingerprint": "f", "rank": 1})
    rows = int(SPEC.embedded_lengths(LENGTHS[: len(ids)]).sum())
    writer.write(
        np.arange(len(ids)), {"mean/layer_2": np.ones((len(ids), dim)), "per_residue/layer_2": np.ones((rows, dim))}
    )
    writer.close()
    return path


def test_a_whole_shard_has_no_problem(tmp_path):
    assert SHAPES == {"mean/layer_2": (3, 4), "per_residue/layer_2": (5 + 6 + 1022, 4)}
    assert shard_problem(write_shard(tmp_path / "s.h5"), IDS, {"fingerprint": "f", "rank": 1}, SHAPES) is None


def test_each_problem_is_named(tmp_path):
    path = write_shard(tmp_path / "s.h5")
    assert shard_problem(tmp_path / "none.h5", IDS, {}) == "does not exist"
    assert shard_problem(path, IDS, {"fingerprint": "g", "rank": 1}) == "was made with other settings (fingerprint)"
    assert (
        shard_problem(path, IDS, {}, dataset_shapes(SPEC, LENGTHS, 8)) == "has mean/layer_2 of shape (3, 4), not (3, 8)"
    )
    assert shard_problem(path, IDS[[0, 2, 1]], {}).startswith("does not hold exactly the planned IDs (0 missing")
    assert "1 missing" in shard_problem(path, np.array(["a", "b", "c", "d"], dtype=object), {})
    path.write_bytes(path.read_bytes()[:1500])
    assert shard_problem(path, IDS, {}).startswith("is unreadable (")


def test_rows_land_at_their_positions_whatever_the_order_written(tmp_path):
    """Chunks hold sequences in batch order; the shard holds them in plan order, per-residue
    rows included."""
    writer = ShardWriter(tmp_path / "s.h5", IDS, LENGTHS, SPEC, 4, "float16", {})
    per_residue = {i: np.full((n, 4), i + 1.0) for i, n in enumerate([5, 6, 1022])}
    writer.write(
        np.array([2, 0]),
        {
            "mean/layer_2": np.array([[3.0] * 4, [1.0] * 4]),
            "per_residue/layer_2": np.concatenate([per_residue[2], per_residue[0]]),
        },
    )
    with pytest.raises(RuntimeError, match="1 rows were never written"):
        writer.close()
    writer = ShardWriter(tmp_path / "s.h5", IDS, LENGTHS, SPEC, 4, "float16", {})
    writer.write(
        np.array([2, 0]),
        {
            "mean/layer_2": np.array([[3.0] * 4, [1.0] * 4]),
            "per_residue/layer_2": np.concatenate([per_residue[2], per_residue[0]]),
        },
    )
    writer.write(np.array([1]), {"mean/layer_2": np.array([[2.0] * 4]), "per_residue/layer_2": per_residue[1]})
    writer.close()
    with h5py.File(tmp_path / "s.h5") as h5:
        assert h5["mean/layer_2"].dtype == np.float16 and h5["truncated"][:].tolist() == [False, False, True]
        assert h5["mean/layer_2"][:, 0].tolist() == [1, 2, 3]
        offsets = h5["residue_offsets"][:]
        assert offsets.tolist() == [0, 5, 11, 1033]
        rows = h5["per_residue/layer_2"][:, 0]
        assert [set(rows[a:b]) for a, b in zip(offsets[:-1], offsets[1:])] == [{1}, {2}, {3}]
        assert list(h5.attrs["pooling"]) == ["mean", "per_residue"] and list(h5.attrs["layers"]) == [2]
