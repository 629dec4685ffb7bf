"""Finished embeddings, kept by content: the store every rank reads before computing and writes as it goes.

A store directory holds the results of one set of numeric settings (the model's content, layers,
poolings, stored and compute precision, engine), named by a key of them, so results of other
settings can never be mixed in. How proteins longer than the model takes are embedded
(``long_sequences``, ``window_overlap``) is not part of that key: the others' outputs are the same
either way, and are reused when it changes; a long protein's own key carries it
(``sequence_keys``). Inside, segment files each hold some sequences' outputs, keyed by content:

- ``digests``: [m, 16] uint8, the sequences' keys (``sequence_keys``)
- ``lengths``: [m] int64 input lengths (which fix the per-residue row counts)
- one dataset per output (``outputs.py``): pooled [m, dim]; per-residue [rows, dim], each
  sequence's rows one after another in segment order
- attributes: the settings identity, long-protein handling included (which fixes a long
  protein's per-residue rows)

A segment is written to a temporary name, flushed to disk and renamed, so it exists whole or not
at all; its datasets carry HDF5's Fletcher-32 checksums, so corruption is caught on any read.
A segment that cannot be read is deleted and its sequences are computed again. Identical
sequences (same residues under other IDs, or in another input) are computed once; a rerun
computes only what no segment holds. Snakemake never sees the store, so it never deletes it.
"""

import dataclasses
import hashlib
import json
import logging
import os
import secrets
import threading
from pathlib import Path

import h5py
import numpy as np

from esmshard import EsmShardError
from esmshard.faults import crash_point
from esmshard.files import atomic_output, ensure_space
from esmshard.index import DIGEST
from esmshard.outputs import OutputSpec, pooling_of, ranges_index, residue_offsets
from esmshard.shard import DTYPES, dataset_shapes, plain_attr, write_attrs

log = logging.getLogger(__name__)

_CHUNK_BYTES = 4 << 20  # HDF5 storage chunks of about 4 MiB, each with its own checksum
# A shard refers to its per-residue rows in the store through at most this many mappings (each
# HDF5 reads on opening the dataset); beyond, the rows are copied.
MAX_VIRTUAL_RUNS = 4096


class DamagedSegment(EsmShardError):
    """A store segment failed its checksum or could not be read; it has been deleted."""


def settings_identity(model_digest: str, model_family: str, spec: OutputSpec, dtype: str, engine: str) -> dict:
    """Every setting that changes the numbers, but the compute precision: the store adds the one
    a rank computes in (``precision`` resolved on its device), so that ``auto`` and the precision
    it means on that device are one. (The digest fixes the family; the family is here to be read.)"""
    return {
        "model_digest": model_digest,
        "model_family": model_family,
        **spec.attrs(),
        "dtype": dtype,
        "engine": engine,
    }


# Not in a store directory's key (see the module docstring).
LONG_PROTEIN_SETTINGS = ("long_sequences", "window_overlap")


def sequence_keys(digests: np.ndarray, lengths: np.ndarray, spec: OutputSpec) -> np.ndarray:
    """The store's key of each sequence: the digest of its residues, hashed with how it is
    embedded (truncated, or windows and their overlap) where it is longer than the model takes."""
    keys = np.array(digests, copy=True)
    how = json.dumps({key: spec.attrs()[key] for key in LONG_PROTEIN_SETTINGS}, sort_keys=True).encode()
    for i in np.flatnonzero(np.asarray(lengths) > spec.max_residues).tolist():
        keys[i] = np.frombuffer(hashlib.blake2b(keys[i].tobytes() + how, digest_size=16).digest(), DIGEST)[0]
    return keys


def store_key(identity: dict) -> str:
    """A directory name that changes with anything in ``identity``."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def store_directory(root, identity: dict) -> Path:
    return Path(root) / store_key({key: value for key, value in identity.items() if key not in LONG_PROTEIN_SETTINGS})


class Store:
    """One settings identity's segments; ``writer`` names this process's new segments."""

    def __init__(self, root, identity: dict, spec: OutputSpec, dim: int, dtype: str, writer: str = "rank", only=None):
        """``only``: the keys the caller will ask for (a rank's share); the store holds no others,
        so that a rank's memory follows its share, not everything every run stored."""
        self.directory = store_directory(root, identity)
        self.identity, self.spec, self.dim, self.dtype, self.writer = identity, spec, dim, dtype, writer
        self.directory.mkdir(parents=True, exist_ok=True)
        for stray in self.directory.glob(f".seg_{writer}_*"):  # this writer's temporaries of a killed write
            stray.unlink(missing_ok=True)
        wanted = None if only is None else np.unique(only)
        self.segments: list[Path] = []
        self._specs: list[OutputSpec] = []  # each segment's, long-protein handling included
        self._residue_rows: list[int] = []  # each segment's per-residue rows
        keys, segment_of, row_of, starts, ends = [], [], [], [], []
        for path in sorted(self.directory.glob("seg_*.h5")):
            digests, lengths, segment_spec = self._read_keys(path)
            if digests is None:
                continue
            offsets = residue_offsets(segment_spec.embedded_lengths(lengths))
            rows = np.arange(len(digests)) if wanted is None else np.flatnonzero(_search(wanted, digests)[1])
            keys.append(digests[rows])
            segment_of.append(np.full(len(rows), len(self.segments), np.int64))
            row_of.append(rows.astype(np.int64))
            starts.append(offsets[rows])
            ends.append(offsets[rows + 1])
            self._specs.append(segment_spec)
            self._residue_rows.append(int(offsets[-1]))
            self.segments.append(path)
        keys = np.concatenate(keys) if keys else np.empty(0, DIGEST)
        order = np.argsort(keys, kind="stable")
        self._keys = keys[order]
        self._segment, self._row, self._start, self._end = (
            np.concatenate(column)[order] if column else np.empty(0, np.int64)
            for column in (segment_of, row_of, starts, ends)
        )

    def _read_keys(self, path: Path):
        """The segment's (digests, lengths, spec), or Nones (and the segment deleted) if it is not
        whole or not ours."""
        try:
            with h5py.File(path, "r") as h5:
                identity = {key: plain_attr(h5.attrs.get(key)) for key in self.identity}
                if any(
                    identity[key] != value for key, value in self.identity.items() if key not in LONG_PROTEIN_SETTINGS
                ):
                    problem = "made with other settings"
                else:
                    spec = self._segment_spec(identity)
                    digests = np.ascontiguousarray(h5["digests"][:]).view(DIGEST).ravel()
                    lengths = h5["lengths"][:]
                    shapes = {name: h5[name].shape for name in self.spec.names}
                    problem = self._shape_problem(len(digests), lengths, shapes, spec)
        except Exception as error:  # a torn or corrupt file raises many kinds
            problem = f"unreadable: {' '.join(str(error).split())[:200]}"
        if problem:
            _discard(path, problem)
            return None, None, None
        return digests, lengths, spec

    def _segment_spec(self, identity: dict) -> OutputSpec:
        """This store's outputs, embedded as the segment says long proteins were."""
        return dataclasses.replace(
            self.spec,
            long_sequences=str(identity.get("long_sequences", self.spec.long_sequences)),
            window_overlap=int(identity.get("window_overlap", self.spec.window_overlap)),
        )

    def _shape_problem(self, n: int, lengths, shapes: dict, spec: OutputSpec):
        if len(lengths) != n:
            return f"{len(lengths)} lengths for {n} sequences"
        for name, shape in dataset_shapes(spec, lengths, self.dim).items():
            if shapes[name] != shape:
                return f"{name} has shape {shapes[name]}, not {shape}"
        return None

    def find(self, digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(segment number, row) of each digest; segment -1 where the store has none."""
        if not len(self._keys):
            return np.full(len(digests), -1), np.full(len(digests), -1)
        at, found = _search(self._keys, digests)
        return np.where(found, self._segment[at], -1), np.where(found, self._row[at], -1)

    def segments_holding(self, digests: np.ndarray) -> list[Path]:
        """The segments that hold any of ``digests``."""
        return [self.segments[number] for number in np.unique(self.find(digests)[0]).tolist() if number >= 0]

    def write(self, digests: np.ndarray, lengths: np.ndarray, outputs: dict[str, np.ndarray]) -> Path:
        """A new segment of these sequences' outputs (rows in the order of ``digests``)."""
        path = self.directory / f"seg_{self.writer}_{secrets.token_hex(6)}.h5"
        ensure_space(self.directory, sum(map(_allocated_bytes, outputs.values())), "a store segment")
        with atomic_output(path) as tmp:
            with h5py.File(tmp, "w") as h5:
                h5.create_dataset("digests", data=digests.view(np.uint8).reshape(-1, DIGEST.itemsize))
                h5.create_dataset("lengths", data=np.asarray(lengths, np.int64))
                for name, values in outputs.items():
                    values = np.asarray(values, DTYPES[self.dtype])  # a copy only where the type differs
                    h5.create_dataset(name, data=values, chunks=(_chunk_rows(values), self.dim), fletcher32=True)
                write_attrs(h5, self.identity)
            with open(tmp, "rb") as handle:  # on disk before the rename makes it count
                os.fsync(handle.fileno())
            crash_point("segment-written")
        log.info("wrote %s (%d sequences)", path.name, len(digests))
        return path

    def residue_runs(self, digests: np.ndarray):
        """Where the per-residue rows of ``digests`` (all in the store) lie, in order: runs of
        (segment path, its rows, first row, end row) of consecutive rows of one segment; None
        where they take more than MAX_VIRTUAL_RUNS runs (sequences reused from many earlier runs),
        for the caller to copy them instead."""
        at, _ = _search(self._keys, digests)
        segment, starts, ends = self._segment[at], self._start[at], self._end[at]
        new_run = np.ones(len(digests), bool)
        new_run[1:] = (segment[1:] != segment[:-1]) | (starts[1:] != ends[:-1])
        firsts = np.flatnonzero(new_run)
        if len(firsts) > MAX_VIRTUAL_RUNS:
            return None
        lasts = np.append(firsts[1:], len(digests)) - 1
        return [
            (self.segments[segment[f]], self._residue_rows[segment[f]], int(starts[f]), int(ends[e]))
            for f, e in zip(firsts.tolist(), lasts.tolist())
        ]

    def copy_to(self, writer, digests: np.ndarray) -> None:
        """Write the outputs ``writer`` (a ShardWriter) takes of ``digests`` (all in the store) to its
        rows 0..n-1, one segment in memory at a time. A segment found damaged is deleted and
        DamagedSegment raised, so that the caller computes its sequences again."""
        segment, row = self.find(digests)
        if (segment < 0).any():
            raise EsmShardError(f"the store {self.directory} lacks {int((segment < 0).sum())} of the sequences")
        for number in np.unique(segment).tolist():
            positions = np.flatnonzero(segment == number)
            writer.write(positions, self._read_rows(number, row[positions], writer.names))

    def _read_rows(self, number: int, rows: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        path = self.segments[number]
        try:
            with h5py.File(path, "r") as h5:
                lengths = h5["lengths"][:]
                outputs = {name: h5[name][:] for name in names}
        except Exception as error:
            path.unlink(missing_ok=True)
            raise DamagedSegment(
                f"store segment {path} is damaged ({' '.join(str(error).split())[:200]}); it was deleted"
            ) from None
        embedded = self._specs[number].embedded_lengths(lengths)
        residue_rows = ranges_index(residue_offsets(embedded)[rows], embedded[rows])
        return {
            name: values[residue_rows if pooling_of(name) == "per_residue" else rows]
            for name, values in outputs.items()
        }


def _search(keys: np.ndarray, digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(where each digest is among the sorted ``keys``, whether it is there)."""
    if not len(keys):
        return np.zeros(len(digests), np.int64), np.zeros(len(digests), bool)
    at = np.minimum(np.searchsorted(keys, digests), len(keys) - 1)
    return at, keys[at] == digests


def _chunk_rows(values: np.ndarray) -> int:
    """Rows per HDF5 chunk of a segment's dataset: at most about _CHUNK_BYTES, the rows spread
    evenly over the chunks (HDF5 allocates the last chunk whole: 10,000 rows in chunks of 1,638
    would take 11,466 rows of disk)."""
    most = max(1, min(len(values), _CHUNK_BYTES // max(1, values[:1].nbytes)))
    chunks = -(-len(values) // most)
    return max(1, -(-len(values) // max(1, chunks)))


def _allocated_bytes(values: np.ndarray) -> int:
    """What HDF5 allocates for ``values`` as a segment's dataset: whole chunks (the last one of a
    dataset in full), each with its checksum. A full disk must be seen before HDF5 meets it."""
    rows = _chunk_rows(values)
    chunks = -(-len(values) // rows)
    return chunks * (rows * values[:1].nbytes + 4)


def discard_damaged(paths, names: list[str]) -> list[Path]:
    """Read the datasets ``names`` of each segment in full, so HDF5 checks every checksum; delete
    the segments that fail (their sequences are then computed again) and return them."""
    damaged = []
    for path in paths:
        try:
            with h5py.File(path, "r") as h5:
                for name in names:
                    dataset = h5[name]
                    for start in range(0, len(dataset), 1 << 16):  # blocks of rows: bounded memory
                        dataset[start : start + (1 << 16)]
        except Exception as error:  # a torn or corrupt file raises many kinds
            _discard(Path(path), f"damaged: {' '.join(str(error).split())[:200]}")
            damaged.append(Path(path))
    return damaged


def _discard(path: Path, problem: str) -> None:
    """Delete a segment that cannot be used (the next rank to need its sequences computes them)."""
    log.warning("discarding store segment %s (%s); its sequences will be computed again", path, problem)
    path.unlink(missing_ok=True)


class SegmentWriter:
    """Writes a store's segments on a background thread, so that the rank's GPU goes on computing
    while the disk writes (h5py lets go of the GIL while HDF5 writes). ``submit`` first waits for
    the segment before: at most one is being written while the next fills, which bounds host memory."""

    def __init__(self, store: Store):
        self.store, self._done, self._error = store, None, None

    def submit(self, make_segment) -> None:
        """Write the segment that ``make_segment()`` returns ((digests, lengths, outputs), as
        ``Store.write`` takes them), in the background."""
        self.wait()
        self._done = threading.Event()
        threading.Thread(target=self._write, args=(make_segment, self._done), name="segment-writer").start()

    def _write(self, make_segment, done: threading.Event) -> None:
        try:
            self.store.write(*make_segment())
        except BaseException as error:  # raised in the caller's thread by wait()
            self._error = error
        finally:
            done.set()

    def wait(self) -> None:
        """Until the segment being written is on disk; raises what went wrong writing it. A stop
        signal's exception may interrupt the wait, and the next wait waits again (an Event, not
        Thread.join: an interrupted join can mark a running thread as finished)."""
        if self._done is not None:
            self._done.wait()
            self._done = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
