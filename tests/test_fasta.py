import bz2
import gzip
import lzma
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import esmshard
from esmshard import EsmShardError, fasta
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


COMPRESSIONS = {"gz": gzip, "bz2": bz2, "xz": lzma}
# Many records, so that the damage lies inside the compressed stream, not in its header.
TEXT = "".join(f">s{i}\nMKVLLACDEFGHIK\n" for i in range(20000)).encode()


@pytest.mark.parametrize("suffix", ["gz", "bz2", "xz"])
def test_reads_bzip2_and_xz_by_content_like_gzip(tmp_path, suffix):
    path = tmp_path / "a.fa"  # no telling suffix: the content decides
    path.write_bytes(COMPRESSIONS[suffix].compress(b">x\nMKV\n>y\nWW\n"))
    assert [(r.id, r.residues) for r in read_fasta(path)] == [("x", b"MKV"), ("y", b"WW")]


@pytest.mark.parametrize(
    "suffix, kind, damage, problem",
    [
        ("gz", "gzip", "truncated", "Compressed file ended before the end-of-stream marker was reached"),
        ("gz", "gzip", "overwritten", "Error -3 while decompressing data: invalid"),
        ("gz", "gzip", "trailing junk", "Not a gzipped file (b'ju')"),
        ("bz2", "bzip2", "truncated", "Compressed file ended before the end-of-stream marker was reached"),
        ("bz2", "bzip2", "overwritten", "Invalid data stream"),
        ("xz", "xz", "truncated", "Compressed file ended before the end-of-stream marker was reached"),
        # This damage first decompresses to FASTA without a line end, then fails the check.
        ("xz", "xz", "overwritten", "Corrupt input data"),
    ],
)
def test_damaged_compressed_data_is_named(tmp_path, suffix, kind, damage, problem):
    data = COMPRESSIONS[suffix].compress(TEXT)
    half = len(data) // 2
    data = {
        "truncated": data[:half],
        "overwritten": data[:half] + bytes(64) + data[half + 64 :],
        "trailing junk": data + b"junk",
    }[damage]
    path = tmp_path / f"a.fa.{suffix}"
    path.write_bytes(data)
    with pytest.raises(EsmShardError) as error:
        list(read_fasta(path))
    assert str(error.value).startswith(f"{path}: cannot read file: {problem}")
    assert str(error.value).endswith(f" (damaged or truncated {kind} data)")


def test_zip_and_zstd_say_what_to_do(tmp_path):
    path = tmp_path / "a.fasta.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a.fasta", ">x\nMKV\n")
    with pytest.raises(EsmShardError) as error:
        list(read_fasta(path))
    assert str(error.value) == f"{path}: zip archives are not supported; unzip it, or gzip it"
    path = tmp_path / "a.fasta.zst"
    path.write_bytes(b"(\xb5/\xfd\x04\x00")
    with pytest.raises(EsmShardError, match=r"a.fasta.zst: zstd compression is not supported; decompress it"):
        list(read_fasta(path))


def test_binary_junk_is_not_fasta(tmp_path):
    path = tmp_path / "a.fasta"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(EsmShardError) as error:
        list(read_fasta(path))
    assert str(error.value) == (
        f"{path}: line 1: text before the first '>' header; this is not FASTA (starts with b'\\x89PNG')"
    )


def test_an_unreadable_file_is_named(tmp_path):
    with pytest.raises(EsmShardError) as error:
        list(read_fasta(tmp_path / "missing.fasta"))
    assert str(error.value) == f"{tmp_path / 'missing.fasta'}: cannot read file: No such file or directory"


@pytest.mark.parametrize("end", ["\r\n", "\r"], ids=["windows", "classic-mac"])
def test_windows_and_classic_mac_line_endings(tmp_path, end):
    path = tmp_path / "a.fasta"
    path.write_bytes(">one first\nMK V\nlle\n\n>two\nACD*\n".replace("\n", end).encode())
    records = list(read_fasta(path))
    assert [(r.id, r.residues) for r in records] == [("one", b"MKVLLE"), ("two", b"ACD")]
    assert [r.offset for r in records] == [0, path.read_bytes().index(b">two")]
    assert [(r.number, r.line) for r in records] == [(1, 1), (2, 5)]


def test_line_ends_split_across_read_blocks(tmp_path, monkeypatch):
    path = tmp_path / "a.fasta"
    path.write_bytes(b">a x\r\nMKV\r\nLL\r>b\rWW\n\n>c\nMMMMMMMMMMMMMMMMMMMM\r\nK")
    expected = [(r.id, r.residues, r.offset, r.line) for r in read_fasta(path)]
    assert [e[:2] for e in expected] == [("a", b"MKVLL"), ("b", b"WW"), ("c", b"MMMMMMMMMMMMMMMMMMMMK")]
    for size in range(1, 9):
        monkeypatch.setattr(fasta, "_READ_BLOCK", size)
        assert [(r.id, r.residues, r.offset, r.line) for r in read_fasta(path)] == expected


@pytest.mark.parametrize("compress", [lambda data: data, gzip.compress], ids=["plain", "gzip"])
def test_a_utf8_byte_order_mark_is_skipped(tmp_path, compress):
    text = "\ufeff>x\nMKV\n>y\nWW\n".encode()
    path = tmp_path / "a.fasta"
    path.write_bytes(compress(text))
    records = list(read_fasta(path))
    assert [(r.id, r.residues) for r in records] == [("x", b"MKV"), ("y", b"WW")]
    assert [r.offset for r in records] == [3, text.index(b">y")]  # byte offsets of the '>'


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
        (
            ">x\nMK\n>a\x00b desc\nMKV\n",
            "record 2 ('a\\x00b', line 3): sequence ID has the control character '\\x00' at position 2; "
            "IDs must be printable",
        ),
        (">x\x7f\nMK\n", "record 1 ('x\\x7f', line 1): sequence ID has the control character '\\x7f'"),
    ],
)
def test_bad_input_names_file_record_and_position(tmp_path, text, expected):
    path = write(tmp_path / "bad.fasta", text)
    with pytest.raises(EsmShardError) as error:
        list(read_fasta(path))
    assert str(path) in str(error.value)
    assert expected in str(error.value)


def test_ids_refuse_only_ascii_control_characters(tmp_path):
    path = write(tmp_path / "a.fasta", ">sp|P12345|ÄB_HUMAN\u00a0x\tdesc\x01\nMKV\n")
    assert next(read_fasta(path)).id == "sp|P12345|ÄB_HUMAN\u00a0x"


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


def test_replace_makes_one_x_of_a_character_utf8_spells_in_several_bytes(tmp_path):
    path = tmp_path / "accents.fasta"
    path.write_bytes(">p1\nMK\u00e9\u2192V\n".encode("utf-8") + b">p2\nMK\xb5V\n")  # p2: one Latin-1 byte
    first, second = read_fasta(path, invalid_residues="replace")
    assert (first.residues, first.replaced) == (b"MKXXV", 2)
    assert (second.residues, second.replaced) == (b"MKXV", 1)
