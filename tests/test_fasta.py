import gzip
import subprocess
import sys
from pathlib import Path

import pytest

import esmshard
from esmshard import EsmShardError
from esmshard.fasta import expand_fasta_paths, read_fasta


def write(path, text: str):
    path.write_text(text)
    return path


def test_reads_multiline_records_with_offsets_and_upper_cases(tmp_path):
    path = write(tmp_path / "a.fasta", ">one first protein\nMKV\nlle\n\n>two\nACD*\n")
    records = list(read_fasta(path))
    assert [r.id for r in records] == ["one", "two"]
    assert records[0].residues == b"MKVLLE"
    assert records[1].residues == b"ACD"  # one trailing stop codon dropped
    assert [r.offset for r in records] == [0, path.read_bytes().index(b">two")]
    assert [(r.number, r.line) for r in records] == [(1, 1), (2, 5)]


def test_reads_gzip_by_content(tmp_path):
    path = tmp_path / "a.fa.gz"
    with gzip.open(path, "wt") as handle:
        handle.write(">x\nMKV\n>y\nWW\n")
    assert [(r.id, r.residues) for r in read_fasta(path)] == [("x", b"MKV"), ("y", b"WW")]


def test_windows_line_endings_and_inner_spaces(tmp_path):
    path = write(tmp_path / "a.fasta", ">x\r\nMK V\r\nLL\r\n")
    assert next(read_fasta(path)).residues == b"MKVLL"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "no FASTA records"),
        ("\n\n", "no FASTA records"),
        ("@read1\nACGT\n+\nIIII\n", "line 1: this looks like FASTQ"),
        ("MKV\n>x\nMKV\n", "line 1: text before the first '>' header"),
        (">x\nMKV\n>empty\n>z\nMK\n", "record 2 ('empty', line 3): record has no residues"),
        (">x\n*\n", "record 1 ('x', line 1): record has no residues"),
        (">x\nMKV\n>y\nMKJV\n", "record 2 ('y', line 3): residue 3 is 'J'"),
        (">x\nMKV-A\n", "residue 4 is '-'"),
        (">x\nMK**\n", "residue 3 is '*'"),
        ("> \nMKV\n", "record 1 (line 1): header has no sequence ID"),
    ],
)
def test_bad_input_names_file_record_and_position(tmp_path, text, expected):
    path = write(tmp_path / "bad.fasta", text)
    with pytest.raises(EsmShardError) as error:
        list(read_fasta(path))
    assert str(path) in str(error.value)
    assert expected in str(error.value)


def test_replace_maps_unknown_characters_to_x_and_counts_them(tmp_path):
    path = write(tmp_path / "a.fasta", ">x\nMKJ-V*\n")
    record = next(read_fasta(path, invalid_residues="replace"))
    assert record.residues == b"MKXXV"
    assert record.replaced == 2


def test_all_25_esm_letters_are_accepted(tmp_path):
    path = write(tmp_path / "a.fasta", ">x\nACDEFGHIKLMNPQRSTVWYXBUZO\n")
    assert next(read_fasta(path)).replaced == 0


def test_expand_paths_and_globs(tmp_path):
    for name in ("b.fasta", "a.fasta", "c.txt"):
        (tmp_path / name).write_text(">x\nM\n")
    paths = expand_fasta_paths([str(tmp_path / name) for name in ("*.fasta", "a.fasta", "c.txt")])
    assert paths == [tmp_path / "a.fasta", tmp_path / "b.fasta", tmp_path / "c.txt"]
    with pytest.raises(EsmShardError, match=r"^fasta: the pattern '.*/\*\.fa' matches no file$"):
        expand_fasta_paths(str(tmp_path / "*.fa"))
    with pytest.raises(EsmShardError, match=r"^fasta: .*/missing.fasta does not exist or is not a file$"):
        expand_fasta_paths(str(tmp_path / "missing.fasta"))


def test_a_file_name_with_glob_characters_is_taken_literally(tmp_path):
    (tmp_path / "data[1].fasta").write_text(">x\nM\n")
    (tmp_path / "data1.fasta").write_text(">y\nM\n")
    assert expand_fasta_paths(str(tmp_path / "data[1].fasta")) == [tmp_path / "data[1].fasta"]
    assert expand_fasta_paths(str(tmp_path / "data[0-9].fasta")) == [tmp_path / "data1.fasta"]


def test_home_is_expanded_and_paths_come_back_as_given(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.fasta").write_text(">x\nM\n")
    assert expand_fasta_paths(["~/a.fasta", "~/*.fasta"]) == [tmp_path / "a.fasta"]
    assert expand_fasta_paths(["a.fasta", "./a.fasta", str(tmp_path / "a.fasta")]) == [Path("a.fasta")]


def test_fasta_module_needs_only_the_standard_library():
    # The Snakefile imports it while parsing, where numpy, h5py and torch may be missing.
    code = "import sys; sys.modules.update(numpy=None, h5py=None, torch=None); import esmshard.fasta"
    scripts = Path(esmshard.__file__).parents[1]
    subprocess.run([sys.executable, "-c", code], cwd=scripts, check=True)
