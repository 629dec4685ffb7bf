"""Streaming FASTA reading with the validation policy ESM-2 needs.

Every record is checked as it streams by, so that bad input stops the run before any model
work. Memory holds one record at a time. This module needs only the standard library: the
Snakefile imports it when it is parsed, before numpy, h5py or torch need to be installed.
"""

import bz2
import glob
import gzip
import hashlib
import io
import lzma
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

from esmshard import EsmShardError

# The 25 residue letters every model family here takes: the 20 standard amino acids plus X B U Z
# O (in the ESM alphabets and ESM C's; ProtT5 reads U Z O B as X, as Rostlab's scripts do).
RESIDUES = b"ACDEFGHIKLMNPQRSTVWYXBUZO"
INVALID_POLICIES = ("error", "replace")

_DELETE_VALID = bytes(RESIDUES)
# Maps every byte that is not one of RESIDUES to X (used with invalid_residues: replace).
_TO_X = bytes(c if c in RESIDUES else ord("X") for c in range(256))

# Compressions read, recognised by their magic bytes: file names can lie or lack a suffix.
_COMPRESSIONS = {
    b"\x1f\x8b": ("gzip", gzip.open),
    b"BZh": ("bzip2", bz2.open),
    b"\xfd7zXZ\x00": ("xz", lzma.open),
}
# Formats recognised only to say what to do instead of calling them "not FASTA".
_UNSUPPORTED = {
    b"PK\x03\x04": "zip archives are not supported; unzip it, or gzip it",
    b"(\xb5/\xfd": "zstd compression is not supported; decompress it (zstd -d), or gzip it",
}
_READ_BLOCK = 1 << 16  # bytes read at a time; larger blocks fall out of the CPU cache, slower
_BOM = b"\xef\xbb\xbf"  # the UTF-8 byte order mark some Windows editors write
_CONTROL = re.compile("[\x00-\x1f\x7f]")
# What a damaged or truncated compressed file raises (gzip's and bz2's errors are OSErrors).
_READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)


@dataclass
class Record:
    id: str
    residues: bytes  # upper-case, validated
    offset: int  # byte offset of the '>' line in the (decompressed) file
    number: int  # 1-based record number within the file
    line: int  # 1-based line number of the header
    replaced: int  # residues mapped to X under invalid_residues: replace


def expand_fasta_paths(patterns) -> list[Path]:
    """The files that the config's ``fasta`` names: paths and globs, in the order given, each once.

    ``~`` is expanded first. An entry that names an existing file is that file, even where its
    name has glob characters (``data[1].fasta``); any other entry with glob characters is a
    glob, whose matches come in sorted order. Paths are returned as given (after ``~``), not
    made absolute.
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    paths: dict[str, Path] = {}  # by real path, so that one file named two ways is read once
    for pattern in map(os.path.expanduser, patterns):
        if os.path.isfile(pattern) or not glob.has_magic(pattern):
            matches = [pattern]
        else:
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise EsmShardError(f"fasta: the pattern {pattern!r} matches no file")
        for match in matches:
            if not os.path.isfile(match):
                raise EsmShardError(f"fasta: {match} does not exist or is not a file")
            paths.setdefault(os.path.realpath(match), Path(match))
    return list(paths.values())


def fasta_list_key(paths) -> str:
    """A name for these files in this order, each by its path as given (a results folder moved
    with its inputs keeps its name), size and modification time: another list, another order, or
    a file replaced (even by an older one) has another name."""
    stats = [(str(path), stat.st_size, stat.st_mtime_ns) for path in paths for stat in [os.stat(path)]]
    return hashlib.sha256(repr(stats).encode()).hexdigest()[:16]


def open_fasta(path: Path):
    """Open a FASTA file for binary reading, decompressed; returns (handle, compression).

    The compression ('gzip', 'bzip2', 'xz', or None for plain text) comes from the content.
    """
    try:
        with open(path, "rb") as handle:
            magic = handle.read(6)
    except OSError as error:
        raise EsmShardError(f"{path}: cannot read file: {error.strerror}") from None
    for prefix, problem in _UNSUPPORTED.items():
        if magic.startswith(prefix):
            raise EsmShardError(f"{path}: {problem}")
    for prefix, (compression, opener) in _COMPRESSIONS.items():
        if magic.startswith(prefix):
            return opener(path, "rb"), compression
    return open(path, "rb"), None


def read_fasta(path, invalid_residues: str = "error") -> Iterator[Record]:
    """Yield the validated records of one FASTA file (plain, gzip, bzip2 or xz).

    Raises EsmShardError naming the file, record and position of the first problem.
    """
    if invalid_residues not in INVALID_POLICIES:
        raise ValueError(f"invalid_residues must be one of {INVALID_POLICIES}")
    path = Path(path)
    handle, compression = open_fasta(path)
    try:
        with handle:
            try:
                yield from _records(path, handle, invalid_residues)
            except EsmShardError:
                # Damaged data can decompress to bad FASTA before the decompressor notices; then
                # the damage is the problem to report, so read on to find it.
                if compression:
                    while handle.read(_READ_BLOCK):
                        pass
                raise
    except _READ_ERRORS as error:
        damaged = f" (damaged or truncated {compression} data)" if compression else ""
        raise EsmShardError(f"{path}: cannot read file: {error}{damaged}") from None


def _records(path: Path, handle, invalid_residues: str) -> Iterator[Record]:
    header = None  # (id, offset, number, line) of the record being read
    sequence_lines: list[bytes] = []
    number = 0
    offset = _skip_bom(handle)
    for line_no, raw in enumerate(chain.from_iterable(_line_blocks(handle)), start=1):
        line = raw.strip()
        if line.startswith(b">"):
            if header is not None:
                yield _finish(path, header, sequence_lines, invalid_residues)
            number += 1
            header = (_parse_id(path, line, number, line_no), offset, number, line_no)
            sequence_lines = []
        elif line:
            if header is None:
                raise EsmShardError(_not_fasta(path, line, line_no))
            sequence_lines.append(b"".join(line.split()))
        offset += len(raw)
    if header is None:
        raise EsmShardError(f"{path}: no FASTA records (empty file or no '>' header lines)")
    yield _finish(path, header, sequence_lines, invalid_residues)


def _skip_bom(handle) -> int:
    """Skip a UTF-8 byte order mark; returns the bytes skipped, where the first line starts."""
    if handle.read(len(_BOM)) == _BOM:
        return len(_BOM)
    handle.seek(0)
    return 0


def _line_blocks(handle) -> Iterator[list[bytes]]:
    """The lines of a binary stream, a list per block read, each line with its end.

    Lines end at \\n, \\r\\n or a lone \\r (classic Mac); Python's own line iteration ends them
    only at \\n. Memory holds a block or two and the line being read.
    """
    pending: list[bytes] = []  # the unfinished line, perhaps spread over many blocks
    while block := handle.read(_READ_BLOCK):
        pending.append(block)
        if b"\n" not in block and b"\r" not in block:
            continue
        text = b"".join(pending)
        # splitlines also ends lines at a lone \r; readlines (\n only) is faster where there is none.
        lines = text.splitlines(keepends=True) if b"\r" in text else io.BytesIO(text).readlines()
        # The last line may go on in the next block, and a final \r may be half of a \r\n.
        pending = [] if lines[-1].endswith(b"\n") else [lines.pop()]
        yield lines
    if pending:
        yield [b"".join(pending)]


def _parse_id(path: Path, line: bytes, number: int, line_no: int) -> str:
    words = line[1:].split()
    if not words:
        raise EsmShardError(f"{path}: record {number} (line {line_no}): header has no sequence ID")
    try:
        seq_id = words[0].decode("utf-8")
    except UnicodeDecodeError:
        raise EsmShardError(f"{path}: record {number} (line {line_no}): sequence ID is not valid UTF-8") from None
    # No control character belongs in an ID, and HDF5 cannot store a NUL (isprintable is quick).
    control = None if seq_id.isprintable() else _CONTROL.search(seq_id)
    if control:
        raise EsmShardError(
            f"{path}: record {number} ({seq_id!r}, line {line_no}): sequence ID has the control "
            f"character {control[0]!r} at position {control.start() + 1}; IDs must be printable"
        )
    return seq_id


def _not_fasta(path: Path, line: bytes, line_no: int) -> str:
    if line.startswith(b"@"):
        kind = "this looks like FASTQ, not FASTA"
    else:
        kind = "text before the first '>' header; this is not FASTA"
    return f"{path}: line {line_no}: {kind} (starts with {line[:20]!r})"


def _finish(path: Path, header, sequence_lines: list[bytes], invalid_residues: str) -> Record:
    seq_id, offset, number, line_no = header
    residues, replaced = clean_residues(
        b"".join(sequence_lines), f"{path}: record {number} ('{seq_id}', line {line_no})", invalid_residues
    )
    return Record(seq_id, residues, offset, number, line_no, replaced)


def clean_residues(residues: bytes, where: str, invalid_residues: str = "error") -> tuple[bytes, int]:
    """(the residues as the models take them, how many were replaced by X) under the validation
    policy: upper case, one trailing stop codon dropped, characters outside RESIDUES an error
    naming ``where`` and the position (or X with ``invalid_residues: replace``)."""
    residues = residues.upper()
    if residues.endswith(b"*"):  # one stop codon from a translated ORF
        residues = residues[:-1]
    if not residues:
        raise EsmShardError(f"{where}: record has no residues")
    invalid = residues.translate(None, _DELETE_VALID)
    if not invalid:
        return residues, 0
    if invalid_residues == "error":
        position = next(i for i, c in enumerate(residues) if c not in RESIDUES)
        char = residues[position:].decode("utf-8", errors="replace")[0]  # a whole UTF-8 character
        raise EsmShardError(
            f"{where}: residue {position + 1} is {char!r}, which is not one of the 25 "
            f"residue letters ({RESIDUES.decode()}); fix the input or set "
            f"'invalid_residues: replace' to map such characters to X"
        )
    if max(invalid) >= 0x80:  # one X per character, also for one that UTF-8 spells in several bytes
        residues = residues.decode("utf-8", errors="replace").encode("ascii", errors="replace")
        invalid = residues.translate(None, _DELETE_VALID)
    return residues.translate(_TO_X), len(invalid)
