"""The sequence index: one row per sequence, plus the cleaned residues in one flat file.

``sequences.h5`` holds, per sequence, its ID, source file number, byte offset of its header
in the (decompressed) source, residue count and the digest of its residues (which identifies
its embeddings in the store); attributes hold the source paths and a fingerprint of the content.
``residues.bin`` holds every sequence's validated residues back to back, so that ranks read a
sequence with one slice of a memory map (also from compressed input)
and never parse or validate again. Both stay small and fast at 10 million sequences; the
build streams, holding one record and fixed-size blocks of rows in memory.
"""

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from esmshard import EsmShardError
from esmshard.fasta import read_fasta
from esmshard.files import atomic_output

INDEX_FILE = "sequences.h5"
RESIDUES_FILE = "residues.bin"
_BLOCK = 65536  # rows buffered before an HDF5 append
# A sequence's residues as a 16-byte key: collisions are out of reach (2^-64 at 10^10 sequences).
DIGEST = np.dtype((np.void, 16))


@dataclass
class IndexSummary:
    n_sequences: int
    n_residues: int
    replaced_residues: int
    fingerprint: str


def build_index(paths: list[Path], out_dir: Path, invalid_residues: str = "error") -> IndexSummary:
    """Validate every record of every file and write the index into out_dir.

    Nothing is left in out_dir unless every record is valid and every ID unique.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output(out_dir / INDEX_FILE) as index_tmp:
        with atomic_output(out_dir / RESIDUES_FILE) as residues_tmp:
            return _write_index(paths, index_tmp, residues_tmp, invalid_residues)


def _write_index(paths, index_path: Path, residues_path: Path, invalid_residues: str) -> IndexSummary:
    digest = hashlib.sha256()
    id_hashes: list[np.ndarray] = []
    n_sequences = n_residues = replaced = 0
    with h5py.File(index_path, "w") as h5, open(residues_path, "wb") as residues_out:
        columns = {
            "id": h5.create_dataset("id", (0,), h5py.string_dtype(), maxshape=(None,), chunks=(_BLOCK,)),
            "file": h5.create_dataset("file", (0,), np.uint32, maxshape=(None,), chunks=(_BLOCK,)),
            "offset": h5.create_dataset("offset", (0,), np.int64, maxshape=(None,), chunks=(_BLOCK,)),
            "length": h5.create_dataset("length", (0,), np.int64, maxshape=(None,), chunks=(_BLOCK,)),
            "digest": h5.create_dataset(
                "digest",
                (0, DIGEST.itemsize),
                np.uint8,
                maxshape=(None, DIGEST.itemsize),
                chunks=(_BLOCK, DIGEST.itemsize),
            ),
        }
        block = {name: [] for name in columns}

        def flush():
            nonlocal n_sequences
            count = len(block["id"])
            id_hashes.append(np.fromiter(map(_id_hash, block["id"]), np.uint64, count))
            for name, dset in columns.items():
                dset.resize(n_sequences + count, axis=0)
                if name == "digest":
                    dset[n_sequences:] = np.frombuffer(b"".join(block[name]), np.uint8).reshape(count, -1)
                else:
                    dset[n_sequences:] = np.asarray(block[name], dtype=object if name == "id" else dset.dtype)
                block[name].clear()
            n_sequences += count

        for file_number, path in enumerate(paths):
            for record in read_fasta(path, invalid_residues):
                block["id"].append(record.id)
                block["file"].append(file_number)
                block["offset"].append(record.offset)
                block["length"].append(len(record.residues))
                block["digest"].append(hashlib.blake2b(record.residues, digest_size=DIGEST.itemsize).digest())
                residues_out.write(record.residues)
                digest.update(record.id.encode() + b"\n" + record.residues + b"\n")
                n_residues += len(record.residues)
                replaced += record.replaced
                if len(block["id"]) == _BLOCK:
                    flush()
        flush()
        _check_unique_ids(np.concatenate(id_hashes), h5, paths)
        summary = IndexSummary(n_sequences, n_residues, replaced, digest.hexdigest()[:32])
        h5.attrs["files"] = [str(p) for p in paths]
        h5.attrs["fingerprint"] = summary.fingerprint
        h5.attrs["n_residues"] = n_residues
        h5.attrs["replaced_residues"] = replaced
        h5.attrs["invalid_residues"] = invalid_residues
    return summary


def _id_hash(seq_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(seq_id.encode(), digest_size=8).digest(), "little")


def _check_unique_ids(hashes: np.ndarray, h5: h5py.File, paths) -> None:
    """Find duplicate IDs with 8 bytes per sequence, then confirm on the IDs themselves."""
    order = np.argsort(hashes, kind="stable")
    same = np.flatnonzero(hashes[order][1:] == hashes[order][:-1])
    if not len(same):
        return
    ids = h5["id"].asstr()
    files = h5["file"]
    offsets = h5["offset"]
    file_starts = _file_starts(files[:], len(paths))
    for k in same:
        first, second = sorted((int(order[k]), int(order[k + 1])))
        if ids[first] == ids[second]:

            def where(i):
                f = int(files[i])
                return f"{paths[f]} record {i - file_starts[f] + 1} (byte {int(offsets[i])})"

            raise EsmShardError(f"duplicate sequence ID {ids[first]!r}: {where(first)} and {where(second)}")


def _file_starts(file_numbers: np.ndarray, n_files: int) -> np.ndarray:
    return np.searchsorted(file_numbers, np.arange(n_files))


class SequenceIndex:
    """Read access to an index directory; residues come from a memory map."""

    def __init__(self, index_dir):
        index_dir = Path(index_dir)
        with h5py.File(index_dir / INDEX_FILE, "r") as h5:
            self.lengths = h5["length"][:]
            self.fingerprint = str(h5.attrs["fingerprint"])
            self.files = [str(f) for f in h5.attrs["files"]]
        self._index_path = index_dir / INDEX_FILE
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        residues_path = index_dir / RESIDUES_FILE
        self._residues = np.memmap(residues_path, np.uint8, "r") if self.lengths.sum() else None

    def __len__(self) -> int:
        return len(self.lengths)

    def digests(self, positions=None) -> np.ndarray:
        """DIGEST keys of every sequence's residues (read once), or of the given increasing positions."""
        if positions is None or "_digests" in self.__dict__:
            return self._digests if positions is None else self._digests[positions]
        return np.ascontiguousarray(self._span("digest", positions)).view(DIGEST).ravel()

    def ids(self, positions=None) -> np.ndarray:
        """IDs (object array of str) of all sequences (read once), or of the given increasing positions."""
        if positions is None or "_all_ids" in self.__dict__:
            return self._all_ids if positions is None else self._all_ids[positions]
        return self._span("id", positions)

    def _span(self, name: str, positions) -> np.ndarray:
        """Column ``name`` at increasing ``positions``, reading only the rows they span: a rank's
        share is one run of the input, and reading every row would make each rank's cost grow
        with the whole input."""
        positions = np.asarray(positions, np.int64)
        first, end = (int(positions[0]), int(positions[-1]) + 1) if len(positions) else (0, 0)
        with h5py.File(self._index_path, "r") as h5:
            column = h5[name].asstr() if name == "id" else h5[name]
            return column[first:end][positions - first]

    @functools.cached_property
    def _digests(self) -> np.ndarray:
        with h5py.File(self._index_path, "r") as h5:
            return np.ascontiguousarray(h5["digest"][:]).view(DIGEST).ravel()

    @functools.cached_property
    def _all_ids(self) -> np.ndarray:
        with h5py.File(self._index_path, "r") as h5:
            return h5["id"].asstr()[:]

    def residues(self, position: int) -> np.ndarray:
        """The sequence's residues as uint8 ASCII codes (a view of the memory map)."""
        start = self.starts[position]
        return self._residues[start : start + self.lengths[position]]

    def sequence(self, position: int) -> str:
        return self.residues(position).tobytes().decode("ascii")
