import h5py
import numpy as np
import pytest

from esmshard.shard import ShardWriter, shard_problem

IDS = np.array(["a", "b", "c"], dtype=object)


def write_shard(path, ids=IDS, dim=4):
    writer = ShardWriter(path, ids, [5, 6, 7][: len(ids)], dim, "float32", {"fingerprint": "f", "rank": 1})
    writer.write(np.arange(len(ids)), np.ones((len(ids), dim), np.float32), np.zeros(len(ids), bool))
    writer.close()
    return path


def test_a_whole_shard_has_no_problem(tmp_path):
    assert shard_problem(write_shard(tmp_path / "s.h5"), IDS, {"fingerprint": "f", "rank": 1}, 4) is None


def test_each_problem_is_named(tmp_path):
    path = write_shard(tmp_path / "s.h5")
    assert shard_problem(tmp_path / "none.h5", IDS, {}) == "does not exist"
    assert shard_problem(path, IDS, {"fingerprint": "g", "rank": 1}) == "was made with other settings (fingerprint)"
    assert shard_problem(path, IDS, {}, dim=8) == "has embeddings of width (4,), not 8"
    assert shard_problem(path, IDS[[0, 2, 1]], {}).startswith("does not hold exactly the planned IDs (0 missing")
    assert "1 missing" in shard_problem(path, np.array(["a", "b", "c", "d"], dtype=object), {})
    path.write_bytes(path.read_bytes()[:1500])
    assert shard_problem(path, IDS, {}).startswith("is unreadable (")


def test_writer_refuses_to_close_an_incomplete_shard(tmp_path):
    writer = ShardWriter(tmp_path / "s.h5", IDS, [5, 6, 7], 4, "float16", {})
    writer.write(np.array([2, 0]), np.ones((2, 4), np.float32), np.array([True, False]))
    with pytest.raises(RuntimeError, match="1 rows were never written"):
        writer.close()
    with h5py.File(tmp_path / "s.h5") as h5:
        assert h5["embeddings"].dtype == np.float16 and h5["truncated"][:].tolist() == [False, False, True]
