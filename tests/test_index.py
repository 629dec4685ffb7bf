import gzip

import numpy as np
import pytest

from conftest import random_sequences, write_fasta
from esmshard import EsmShardError
from esmshard.index import INDEX_FILE, RESIDUES_FILE, SequenceIndex, build_index


def test_index_holds_every_sequence_in_input_order(tmp_path):
    first = random_sequences(30, seed=1)
    second = {f"other{i}": s for i, s in enumerate(random_sequences(20, seed=2).values())}
    paths = [write_fasta(tmp_path / "a.fasta", first)]
    with gzip.open(tmp_path / "b.fasta.gz", "wt") as handle:
        handle.write("".join(f">{k}\n{v}\n" for k, v in second.items()))
    paths.append(tmp_path / "b.fasta.gz")

    summary = build_index(paths, tmp_path / "index")
    index = SequenceIndex(tmp_path / "index")
    expected = {**first, **second}
    assert summary.n_sequences == len(index) == 50
    assert list(index.ids()) == list(expected)
    assert [index.sequence(i) for i in range(len(index))] == list(expected.values())
    assert summary.n_residues == sum(map(len, expected.values()))
    assert index.files == [str(p) for p in paths]


def test_fingerprint_follows_content_not_file_names(tmp_path):
    records = random_sequences(10)
    a = build_index([write_fasta(tmp_path / "a.fasta", records)], tmp_path / "i1").fingerprint
    b = build_index([write_fasta(tmp_path / "b.fasta", records, width=30)], tmp_path / "i2").fingerprint
    records["seq00003"] = records["seq00003"][:-1] + "W"
    c = build_index([write_fasta(tmp_path / "c.fasta", records)], tmp_path / "i3").fingerprint
    assert a == b != c


def test_duplicate_id_within_a_file(tmp_path):
    path = tmp_path / "a.fasta"
    path.write_text(">x\nMK\n>y\nMK\n>x\nMKV\n")
    with pytest.raises(EsmShardError, match=r"duplicate sequence ID 'x': .*a.fasta record 1 .* and .*a.fasta record 3"):
        build_index([path], tmp_path / "index")
    assert not list((tmp_path / "index").iterdir())  # nothing half-written


def test_duplicate_id_across_files(tmp_path):
    a = write_fasta(tmp_path / "a.fasta", {"p1": "MK", "p2": "MKV"})
    b = write_fasta(tmp_path / "b.fasta", {"p3": "MK", "p2": "MKV"})
    with pytest.raises(
        EsmShardError, match=r"duplicate sequence ID 'p2': .*a.fasta record 2 .* and .*b.fasta record 2"
    ):
        build_index([a, b], tmp_path / "index")


def test_duplicate_detection_at_scale(tmp_path):
    records = random_sequences(70000, seed=3, median=5, cap=8)  # more than one write block
    records["seq69999"] = "MKV"
    path = write_fasta(tmp_path / "a.fasta", records)
    with open(path, "a") as handle:
        handle.write(">seq00007\nMKV\n")
    with pytest.raises(EsmShardError, match="duplicate sequence ID 'seq00007'.*record 8 .*record 70001"):
        build_index([path], tmp_path / "index")


def test_a_bad_record_leaves_no_index_files(tmp_path):
    good = write_fasta(tmp_path / "a.fasta", random_sequences(5))
    bad = tmp_path / "b.fasta"
    bad.write_text(">z\nMKV1\n")
    with pytest.raises(EsmShardError, match="b.fasta: record 1 \\('z', line 1\\): residue 4 is '1'"):
        build_index([good, bad], tmp_path / "index")
    assert not (tmp_path / "index" / INDEX_FILE).exists()
    assert not (tmp_path / "index" / RESIDUES_FILE).exists()
    assert not list((tmp_path / "index").iterdir())


def test_lengths_and_starts_address_the_residue_file(tmp_path):
    records = random_sequences(40, seed=4)
    build_index([write_fasta(tmp_path / "a.fasta", records)], tmp_path / "index")
    index = SequenceIndex(tmp_path / "index")
    assert np.array_equal(index.lengths, [len(s) for s in records.values()])
    assert (tmp_path / "index" / RESIDUES_FILE).stat().st_size == index.lengths.sum()
