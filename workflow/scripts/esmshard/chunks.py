"""Finished work inside a rank, kept across any kill: chunk files in an undeclared work directory.

A chunk holds the outputs of some of the rank's sequences: ``positions`` (rank-local), ``ids``,
one dataset per output (rows in the order of ``positions``; per-residue outputs hold each
sequence's rows one after another), attributes identifying everything that changes the
numbers, and a checksum of its contents. It is written to a temporary name, flushed to disk and renamed, so a chunk either
exists whole or not at all. On restart every chunk is checked (readable, checksum, same identity, IDs
exactly the planned ones at its positions, no overlap, right shapes); a chunk that fails is
deleted and its sequences recomputed, never skipped. Snakemake never sees these files, so it
never deletes them; the rank removes its chunks once the shard holding them is in place.
"""

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import h5py
import numpy as np

from esmshard import atomic_output, crash_point
from esmshard.outputs import pooling_of
from esmshard.shard import DTYPES, plain_attr, write_attrs

log = logging.getLogger(__name__)


def work_key(identity: dict) -> str:
    """A directory name that changes with anything in ``identity`` (fingerprint, model, layer, ...)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


class ChunkStore:
    def __init__(self, directory, ids: np.ndarray, embedded_lengths: np.ndarray, names: list[str], dim: int,
                 dtype: str, identity: dict):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ids, self.embedded_lengths, self.names = ids, embedded_lengths, names
        self.dim, self.dtype, self.identity = dim, dtype, identity
        self.covered = np.zeros(len(ids), bool)
        self.paths: list[Path] = []
        for stray in self.directory.glob(".chunk_*"):  # temporaries of a killed write
            stray.unlink()
        for path in sorted(self.directory.glob("chunk_*.h5")):
            problem = self._check(path)
            if problem:
                log.warning("discarding chunk %s (%s); its sequences will be recomputed", path, problem)
                path.unlink()
            else:
                self.paths.append(path)

    def _check(self, path: Path):
        """None if the chunk is whole and belongs here (and marks it covered), else the problem."""
        try:
            with h5py.File(path, "r") as h5:
                identity = {key: plain_attr(h5.attrs.get(key)) for key in self.identity}
                if identity != self.identity:
                    return "made with other settings"
                positions = h5["positions"][:]
                ids = h5["ids"].asstr()[:]
                outputs = {name: h5[name][:] for name in self.names}
                stored_checksum = plain_attr(h5.attrs.get("checksum"))
        except Exception as error:  # a torn or corrupt file raises many kinds
            return f"unreadable: {' '.join(str(error).split())[:200]}"
        if stored_checksum != _checksum(positions, outputs):
            return "its contents do not match its checksum"
        n = len(positions)
        if n == 0 or positions.min() < 0 or positions.max() >= len(self.ids) or len(np.unique(positions)) != n:
            return "positions outside the rank's plan or repeated"
        for name, values in outputs.items():
            rows = int(self.embedded_lengths[positions].sum()) if pooling_of(name) == "per_residue" else n
            if values.shape != (rows, self.dim) or values.dtype != np.dtype(DTYPES[self.dtype]):
                return f"{name} has shape {values.shape} of {values.dtype}, not {(rows, self.dim)} of {self.dtype}"
        if self.covered[positions].any():
            return "overlaps another chunk"
        if not np.array_equal(ids, self.ids[positions]):
            return "IDs differ from the planned ones at its positions"
        self.covered[positions] = True
        return None

    def write(self, positions: np.ndarray, outputs: dict[str, np.ndarray]) -> None:
        number = 1 + max((int(p.stem.split("_")[1]) for p in self.paths), default=-1)
        path = self.directory / f"chunk_{number:06d}.h5"
        outputs = {name: values.astype(DTYPES[self.dtype]) for name, values in outputs.items()}
        with atomic_output(path) as tmp:
            with h5py.File(tmp, "w") as h5:
                h5.create_dataset("positions", data=positions)
                h5.create_dataset("ids", data=self.ids[positions].astype(object), dtype=h5py.string_dtype())
                for name, values in outputs.items():
                    h5.create_dataset(name, data=values)
                write_attrs(h5, self.identity)
                h5.attrs["checksum"] = _checksum(positions, outputs)
            with open(tmp, "rb") as handle:  # on disk before the rename makes it count
                os.fsync(handle.fileno())
            crash_point("chunk-written")
        self.paths.append(path)
        self.covered[positions] = True
        log.info("wrote %s (%d sequences; %d of %d done)", path.name, len(positions), self.covered.sum(), len(self.ids))

    def read(self):
        """(positions, {name: values}) of every chunk, one chunk in memory at a time."""
        for path in self.paths:
            with h5py.File(path, "r") as h5:
                yield h5["positions"][:], {name: h5[name][:] for name in self.names}

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _checksum(positions, outputs: dict) -> str:
    """Catches silent corruption of the values, which HDF5 itself would read back without error."""
    digest = hashlib.blake2b(digest_size=16)
    for array in (positions, *(outputs[name] for name in sorted(outputs))):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


class PendingRows:
    """Results of finished batches not yet in a chunk."""

    def __init__(self):
        self.parts: list[tuple] = []
        self.count = 0
        self.nbytes = 0

    def add(self, positions, outputs: dict) -> None:
        self.parts.append((positions, outputs))
        self.count += len(positions)
        self.nbytes += sum(values.nbytes for values in outputs.values())

    def take(self):
        """(positions, {name: values}) of everything added, in the order added."""
        positions = np.concatenate([part[0] for part in self.parts])
        outputs = {name: np.concatenate([part[1][name] for part in self.parts]) for name in self.parts[0][1]}
        self.parts, self.count, self.nbytes = [], 0, 0
        return positions, outputs
