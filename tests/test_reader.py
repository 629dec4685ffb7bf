import os
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from conftest import SLURM_PLUGINS
from esmshard import EsmShardError
from esmshard.outputs import OutputSpec
from esmshard.reader import export_npy, export_pt, load_embeddings
from esmshard.shard import ShardWriter

IDS = [f"sp|P{i:05d}|X" for i in range(50)] + ["a/b"]


def write_embeddings(path, ids, spec: OutputSpec):
    """Random vectors of width 8 for ``ids``, as the workflow writes them; returns the lengths."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, len(ids))
    outputs = {name: rng.normal(size=(len(ids), 8)) for name in spec.names}
    for layer in spec.layers if spec.per_residue else []:
        outputs[f"per_residue/layer_{layer}"] = rng.normal(size=(lengths.sum(), 8))
    writer = ShardWriter(path, ids, lengths, spec, 8, "float32", {})
    writer.write(np.arange(len(ids)), outputs)
    writer.close()
    return lengths


@pytest.fixture
def embeddings_file(tmp_path):
    """Mean, BOS and per-residue vectors of layers 6 and 3 of a 6-layer model."""
    path = tmp_path / "embeddings.h5"
    return path, write_embeddings(
        path, IDS, OutputSpec.resolve([-1, 3], ["mean", "bos", "per_residue"], 6, max_residues=1022)
    )


def test_load_all_and_by_id_in_the_order_asked(embeddings_file):
    path, _ = embeddings_file
    all_ids, everything = load_embeddings(path, layer=6)
    assert all_ids == IDS and everything.shape == (51, 8)
    wanted = ["a/b", "sp|P00007|X", "sp|P00003|X", "sp|P00007|X"]
    got_ids, vectors = load_embeddings(path, wanted, layer=-1)
    assert got_ids == wanted
    assert np.array_equal(vectors, everything[[50, 7, 3, 7]])
    _, bos = load_embeddings(path, wanted, pooling="bos", layer=3)
    assert np.array_equal(bos, load_embeddings(path, pooling="bos", layer=3)[1][[50, 7, 3, 7]])


def test_a_file_from_before_the_limit_was_recorded_reads_as_cut_at_1022(embeddings_file):
    path, lengths = embeddings_file
    ids, per_residue = load_embeddings(path, pooling="per_residue", layer=3)
    with h5py.File(path, "r+") as h5:
        del h5.attrs["max_residues"]  # as esmshard wrote embeddings.h5 before 2026-12-07
        assert OutputSpec.from_attrs(h5.attrs).max_residues == 1022
    old_ids, old_per_residue = load_embeddings(path, pooling="per_residue", layer=3)
    assert old_ids == ids and all(np.array_equal(a, b) for a, b in zip(old_per_residue, per_residue))


def test_per_residue_vectors_come_one_array_per_protein(embeddings_file):
    path, lengths = embeddings_file
    ids, per_residue = load_embeddings(path, pooling="per_residue", layer=3)
    assert [len(v) for v in per_residue] == lengths.tolist()
    with h5py.File(path) as h5:  # the one-line h5py read of docs/output-format.md
        offsets, flat = h5["residue_offsets"][:], h5["per_residue/layer_3"][:]
    assert np.array_equal(per_residue[7], flat[offsets[7] : offsets[8]])
    _, two = load_embeddings(path, ["sp|P00007|X", "a/b"], pooling="per_residue", layer=3)
    assert np.array_equal(two[0], per_residue[7]) and np.array_equal(two[1], per_residue[50])


def test_unknown_id_layer_or_pooling_is_named(embeddings_file):
    path, _ = embeddings_file
    with pytest.raises(KeyError, match="zzz"):
        load_embeddings(path, ["sp|P00001|X", "zzz"], layer=6)
    with pytest.raises(KeyError, match=r"holds layers \[3, 6\]: say which one"):
        load_embeddings(path)
    with pytest.raises(KeyError, match="no layer 4"):
        load_embeddings(path, layer=4)
    with pytest.raises(KeyError, match=r"layer -8 is outside this model's layers 0\.\.6"):
        load_embeddings(path, layer=-8)
    with pytest.raises(KeyError, match=r"holds no 'max' output \(it holds mean, bos, per_residue\)"):
        load_embeddings(path, pooling="max", layer=6)


def test_ids_may_be_one_id_or_any_sequence_of_them(embeddings_file):
    path, _ = embeddings_file
    _, everything = load_embeddings(path, layer=6)
    ids, one = load_embeddings(path, "sp|P00007|X", layer=6)
    assert ids == ["sp|P00007|X"] and np.array_equal(one, everything[[7]])
    _, per_residue = load_embeddings(path, "a/b", pooling="per_residue", layer=6)
    assert len(per_residue) == 1
    for sequence in (("a/b", "sp|P00002|X"), np.array(["a/b", "sp|P00002|X"])):
        ids, two = load_embeddings(path, sequence, layer=6)
        assert ids == ["a/b", "sp|P00002|X"] and np.array_equal(two, everything[[50, 2]])


def export(*args) -> subprocess.CompletedProcess:
    """``python -m esmshard export ARGS``, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "esmshard", "export", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env)


def test_export_npy_and_fair_esm_pt(embeddings_file, tmp_path):
    path, lengths = embeddings_file

    def run(*args):
        assert export(path, *args).returncode == 0

    run(str(tmp_path / "npy"))
    _, means = load_embeddings(path, layer=6)
    assert np.array_equal(np.load(tmp_path / "npy/mean_layer_6.npy"), means)
    assert (tmp_path / "npy/ids.txt").read_text().split() == IDS
    assert (
        np.load(tmp_path / "npy/residue_offsets.npy")[-1] == np.load(tmp_path / "npy/per_residue_layer_3.npy").shape[0]
    )
    run(str(tmp_path / "pt"), "--format", "pt")
    saved = torch.load(tmp_path / "pt" / "sp|P00004|X.pt")
    assert saved["label"] == "sp|P00004|X"
    assert torch.equal(saved["mean_representations"][6], torch.from_numpy(means[4]))
    assert torch.equal(
        saved["bos_representations"][3], torch.from_numpy(load_embeddings(path, pooling="bos", layer=3)[1][4])
    )
    assert saved["representations"][6].shape == (lengths[4], 8)


# Plain IDs, IDs that are not safe as file names (one the old '/' -> '%2F' made alike), long IDs.
AWKWARD_IDS = ["P1", "sp|P2|X", "a/b", "a%2Fb", "x" * 300, "x" * 299 + "y", "..", "é~"]


@pytest.fixture
def awkward_file(tmp_path):
    path = tmp_path / "awkward.h5"
    write_embeddings(path, AWKWARD_IDS, OutputSpec.resolve([-1], ["mean"], 2, max_residues=1022))
    return path


def test_pt_files_have_one_bounded_name_per_id_listed_in_ids_tsv(awkward_file, tmp_path):
    out = tmp_path / "pt"
    result = export(awkward_file, out, "--format", "pt")
    assert result.returncode == 0 and result.stdout == f"wrote 8 .pt files to {out}\n"
    names = dict(line.split("\t") for line in (out / "ids.tsv").read_text().splitlines())
    assert list(names) == AWKWARD_IDS
    assert names["P1"] == "P1.pt" and names["sp|P2|X"] == "sp|P2|X.pt"  # as extract.py names them
    assert re.fullmatch(r"a_b~[0-9a-f]{16}\.pt", names["a/b"]) and names["a%2Fb"].startswith("a_2Fb~")
    assert names["x" * 300].startswith("x" * 64 + "~") and names["x" * 299 + "y"].startswith("x" * 64 + "~")
    assert names[".."].startswith("~") and names["é~"].startswith("__~")
    assert sorted(path.name for path in out.iterdir()) == sorted([*names.values(), "ids.tsv"])  # 8 distinct
    _, means = load_embeddings(awkward_file)
    for row, (seq_id, name) in enumerate(names.items()):
        assert len(name.encode()) <= 255
        saved = torch.load(out / name)
        assert saved["label"] == seq_id
        assert torch.equal(saved["mean_representations"][2], torch.from_numpy(means[row]))


def test_ids_that_would_share_a_pt_file_are_an_error(tmp_path):
    write_embeddings(tmp_path / "twice.h5", ["x", "P1", "x"], OutputSpec.resolve([-1], ["mean"], 2, max_residues=1022))
    with pytest.raises(EsmShardError, match=r"twice.h5: IDs \['x', 'x'\] would share a .pt file"):
        export_pt(tmp_path / "twice.h5", tmp_path / "twice")
    assert not (tmp_path / "twice").exists()


def test_an_export_stopped_half_way_leaves_only_whole_files(awkward_file, tmp_path, monkeypatch):
    save = torch.save

    def save_until_a_b(record, path):
        if record["label"] == "a/b":
            path.write_bytes(b"half a file")
            raise KeyboardInterrupt  # as Ctrl-C in the middle of writing it
        save(record, path)

    monkeypatch.setattr(torch, "save", save_until_a_b)
    with pytest.raises(KeyboardInterrupt):
        export_pt(awkward_file, tmp_path / "pt")
    # whole files only, and no ids.tsv yet
    assert sorted(path.name for path in (tmp_path / "pt").iterdir()) == ["P1.pt", "sp|P2|X.pt"]


@pytest.fixture
def bad_paths(embeddings_file, tmp_path):
    """name: (embeddings argument, output directory, exception, message), as a user gets them wrong."""
    fasta = tmp_path / "proteins.fasta"
    fasta.write_text(">x\nMKV\n")
    with h5py.File(tmp_path / "other.h5", "w") as h5:
        h5["id"] = ["x"]
    (tmp_path / "taken").write_text("")
    out = tmp_path / "out"
    return {
        "missing file": (tmp_path / "nothing.h5", out, FileNotFoundError, "nothing.h5: no such file"),
        "other HDF5": (
            tmp_path / "other.h5",
            out,
            EsmShardError,
            "other.h5 is not esmshard embeddings: it has no attribute 'layers', attribute 'pooling'",
        ),
        "FASTA": (fasta, out, EsmShardError, "proteins.fasta is not an HDF5 file, so not esmshard"),
        "output is a file": (
            embeddings_file[0],
            tmp_path / "taken",
            NotADirectoryError,
            "taken exists and is not a directory",
        ),
    }


@pytest.mark.parametrize("case", ["missing file", "other HDF5", "FASTA", "output is a file"])
@pytest.mark.parametrize("format", ["npy", "pt"])
def test_a_bad_path_is_a_one_line_error_naming_it(bad_paths, case, format, tmp_path):
    path, out, error, message = bad_paths[case]
    result = export(path, out, "--format", format)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(f"esmshard export: error: {tmp_path}/{message}")
    assert result.stderr.count("\n") == 1  # one line, no traceback
    assert not (tmp_path / "out").exists()  # nothing was written, not even the directory
    with pytest.raises(error, match=re.escape(message)):
        (export_npy if format == "npy" else export_pt)(path, out)
    if case != "output is a file":
        with pytest.raises(error, match=re.escape(message)):
            load_embeddings(path)
    assert not (tmp_path / "out").exists()


def test_export_tsv_is_read_by_pandas_as_the_file_holds_it(embeddings_file, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(SLURM_PLUGINS)  # where make setup keeps pandas (requirements-slurm.txt)
    import pandas

    path, _ = embeddings_file
    assert export(path, tmp_path / "means.tsv", "--format", "tsv", "--layer", "3").returncode == 0
    table = pandas.read_csv(tmp_path / "means.tsv", sep="\t", index_col="id", keep_default_na=False)
    ids, means = load_embeddings(path, layer=3)
    assert table.index.tolist() == ids and table.shape == (len(IDS), 8)
    assert np.array_equal(table.to_numpy(np.float32), means.astype(np.float32))  # every float32 back exactly
    result = export(path, tmp_path / "x.tsv", "--format", "tsv", "--pooling", "per_residue")
    assert result.returncode == 1 and "--format per-id" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "x.tsv").exists()


def test_export_per_id_is_read_as_protspace_and_eat_read_it(embeddings_file, tmp_path):
    """One dataset per ID, read the way those tools do: {k: f[k][()] for k in f}."""
    path, lengths = embeddings_file
    assert export(path, tmp_path / "means.h5", "--format", "per-id").returncode == 0
    with h5py.File(tmp_path / "means.h5") as f:
        read = {k: f[k][()] for k in f}
        original = {k: f[k].attrs["original_id"] for k in f}
        assert (f.attrs["layer"], f.attrs["pooling"]) == (6, "mean")  # the last layer the file holds
    _, means = load_embeddings(path, layer=6)
    assert sorted(read) == sorted(i.replace("/", "_") for i in IDS) and original["a_b"] == "a/b"
    for row, seq_id in enumerate(IDS):
        assert np.array_equal(read[seq_id.replace("/", "_")], means[row])
    result = export(path, tmp_path / "residues.h5", "--format", "per-id", "--pooling", "per_residue", "--layer", "3")
    assert result.returncode == 0, result.stderr
    _, per_residue = load_embeddings(path, pooling="per_residue", layer=3)
    with h5py.File(tmp_path / "residues.h5") as f:
        for row, seq_id in enumerate(IDS):
            assert np.array_equal(f[seq_id.replace("/", "_")][()], per_residue[row])  # [length, dim]
    result = export(path, tmp_path / "x.h5", "--format", "per-id", "--layer", "4")
    assert (
        result.returncode == 1
        and result.stderr == f"esmshard export: error: {path} holds no layer 4 (it holds [3, 6])\n"
    )
    assert not (tmp_path / "x.h5").exists()
