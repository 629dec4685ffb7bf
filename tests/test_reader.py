import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from esmshard.reader import load_embeddings


@pytest.fixture
def embeddings_file(tmp_path):
    path = tmp_path / "embeddings.h5"
    rng = np.random.default_rng(0)
    ids = [f"sp|P{i:05d}|X" for i in range(50)] + ["a/b"]
    with h5py.File(path, "w") as h5:
        h5.create_dataset("ids", data=np.array(ids, dtype=object), dtype=h5py.string_dtype())
        h5.create_dataset("embeddings", data=rng.normal(size=(len(ids), 8)).astype(np.float32))
        h5.attrs["layer"] = 6
    return path, ids


def test_load_all_and_by_id_in_the_order_asked(embeddings_file):
    path, ids = embeddings_file
    all_ids, everything = load_embeddings(path)
    assert all_ids == ids and everything.shape == (51, 8)
    wanted = ["a/b", "sp|P00007|X", "sp|P00003|X", "sp|P00007|X"]
    got_ids, vectors = load_embeddings(path, wanted)
    assert got_ids == wanted
    assert np.array_equal(vectors, everything[[50, 7, 3, 7]])


def test_unknown_id_is_named(embeddings_file):
    path, _ = embeddings_file
    with pytest.raises(KeyError, match="zzz"):
        load_embeddings(path, ["sp|P00001|X", "zzz"])


def test_export_npy_and_fair_esm_pt(embeddings_file, tmp_path):
    path, ids = embeddings_file
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    def run(*args):
        subprocess.run([sys.executable, "-m", "esmshard", "export", str(path), *args], check=True, env=env)

    run(str(tmp_path / "npy"))
    _, everything = load_embeddings(path)
    assert np.array_equal(np.load(tmp_path / "npy/embeddings.npy"), everything)
    assert (tmp_path / "npy/ids.txt").read_text().split() == ids
    run(str(tmp_path / "pt"), "--format", "pt")
    saved = torch.load(tmp_path / "pt" / "sp|P00004|X.pt")
    assert saved["label"] == "sp|P00004|X"
    assert torch.equal(saved["mean_representations"][6], torch.from_numpy(everything[4]))
    assert (tmp_path / "pt" / "a%2Fb.pt").exists()
