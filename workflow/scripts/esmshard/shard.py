"""Shard files: one rank's embeddings, in the rank's share of input order.

Layout (HDF5; docs/output-format.md has the whole description):
- ``ids``: [n] UTF-8 strings; ``lengths``: [n] int64 residue counts of the input sequences;
  ``truncated``: [n] bool, true where only the first 1022 residues were embedded
- ``residue_offsets``: [n + 1] int64, only with per-residue output
- one dataset per output (``outputs.py``): ``mean/layer_<L>``, ``bos/layer_<L>`` [n, dim];
  ``per_residue/layer_<L>`` [residue_offsets[-1], dim]; float32 (or float16, config ``dtype``)
- attributes: model, layers, pooling, long_sequences, window_overlap, dtype, precision, engine,
  fingerprint (of the index), rank, world_size, versions (JSON of package versions)

A rank that fails for good writes a *failure shard* instead: no datasets, attributes ``failed``
(true), ``rank`` and ``error`` (``write_failure_shard``). Its job still succeeds, so the other
ranks' results are merged; the aggregation counts it as a failed rank (``shard_failure``).
"""

import json
import os
import platform
from importlib import metadata
from pathlib import Path

import h5py
import numpy as np

from esmshard import __version__
from esmshard.files import atomic_output
from esmshard.outputs import OutputSpec, pooling_of, residue_offsets, runs, sorted_rows

DTYPES = {"float32": np.float32, "float16": np.float16}
_CHUNK_BYTES = 4 << 20  # HDF5 chunks of about 4 MiB


def package_versions() -> str:
    """The versions of what made a file: esmshard's own (the code running, installed or a
    checkout's), Python's and its packages'."""
    versions = {"python": platform.python_version(), "esmshard": __version__}
    for package in ("torch", "fair-esm", "h5py", "numpy", "snakemake"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return json.dumps(versions, sort_keys=True)


def dataset_shapes(spec: OutputSpec, lengths, dim: int) -> dict[str, tuple[int, int]]:
    """Each output dataset's shape for sequences of these input lengths."""
    n, residues = len(lengths), int(spec.embedded_lengths(lengths).sum())
    return {name: ((residues if pooling_of(name) == "per_residue" else n), dim) for name in spec.names}


def outputs_nbytes(spec: OutputSpec, lengths, dim: int, dtype, per_residue: bool = True) -> int:
    """Bytes of every output dataset for sequences of these input lengths (``per_residue``
    False: of the pooled ones alone, where the per-residue rows are referred to in the store)."""
    return int(sequence_nbytes(spec, lengths, dim, dtype, per_residue).sum())


def sequence_nbytes(spec: OutputSpec, lengths, dim: int, dtype, per_residue: bool = True) -> np.ndarray:
    """[n] bytes of each sequence's rows in all output datasets (``per_residue``: as outputs_nbytes)."""
    residue_outputs = sum(pooling_of(name) == "per_residue" for name in spec.names)
    rows = len(spec.names) - residue_outputs + residue_outputs * spec.embedded_lengths(lengths) * per_residue
    return rows * dim * np.dtype(dtype).itemsize


def create_outputs(
    h5: h5py.File,
    spec: OutputSpec,
    ids,
    lengths,
    dim: int,
    dtype,
    compression: str = "none",
    residue_runs=None,
    allocate=False,
) -> dict[str, h5py.Dataset]:
    """The row datasets, and the empty output datasets of a shard or merged file (returned, to be
    written). ``compression`` (config ``compression``: none, gzip or lzf) applies to the outputs;
    without it they are contiguous, the fastest layout to write and read. With ``residue_runs``
    (``Store.residue_runs``) the per-residue outputs are instead virtual datasets over the store
    segments that hold their rows, and nothing writes them. With ``allocate`` the contiguous
    outputs get their file space now and are never filled: their bytes are written
    outside HDF5, at ``Dataset.id.get_offset()``. ``ids`` None: an ``ids`` dataset for the caller
    to fill."""
    if ids is None:
        h5.create_dataset("ids", (len(lengths),), h5py.string_dtype())
    else:
        h5.create_dataset("ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype())
    h5.create_dataset("lengths", data=np.asarray(lengths, np.int64))
    h5.create_dataset("truncated", data=spec.truncated(lengths))
    if spec.per_residue:
        h5.create_dataset("residue_offsets", data=residue_offsets(spec.embedded_lengths(lengths)))
    rows_per_chunk = max(1, _CHUNK_BYTES // (dim * np.dtype(dtype).itemsize))
    datasets = {}
    for name, shape in dataset_shapes(spec, lengths, dim).items():
        if residue_runs and pooling_of(name) == "per_residue":  # (none for an empty share: plain)
            _create_virtual(h5, name, shape, dtype, residue_runs)
        elif compression == "none" or not shape[0]:  # HDF5 wants chunks <= data, so an empty one is plain
            allocated = allocate and shape[0]
            datasets[name] = h5.create_dataset(name, shape, dtype, **(_allocated_now() if allocated else {}))
        else:  # byte shuffling puts the floats' exponent bytes together: smaller, faster (docs/benchmarks.md)
            datasets[name] = h5.create_dataset(
                name, shape, dtype, chunks=(min(shape[0], rows_per_chunk), dim), compression=compression, shuffle=True
            )
    return datasets


def _allocated_now() -> dict:
    """create_dataset's options for storage allocated at creation and never filled."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return {"dcpl": dcpl, "fill_time": "never"}


def _create_virtual(h5: h5py.File, name: str, shape, dtype, runs) -> None:
    """Dataset ``name`` made of ``runs`` (segment path, its rows, first row, end row), in order;
    runs may repeat rows. Paths are stored relative to this file's folder (HDF5 resolves them from
    there; the folder of a temporary name renamed into place), so the results folder may move as
    a whole; rows whose segment is missing would read as NaN (``missing_sources`` says which)."""
    layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
    folder, at = Path(h5.filename).resolve().parent, 0
    for path, total, start, end in runs:
        source = h5py.VirtualSource(
            os.path.relpath(Path(path).resolve(), folder), name, shape=(total, shape[1]), dtype=dtype
        )
        layout[at : at + end - start] = source[start:end]
        at += end - start
    h5.create_virtual_dataset(name, layout, fillvalue=np.nan)


def virtual_sources(path, dataset: h5py.Dataset) -> dict[str, Path]:
    """The files a ``dataset`` of the file at ``path`` reads if it is virtual: each as the dataset
    names it (relative to the file's folder) and where that is."""
    if not dataset.is_virtual:
        return {}
    folder = Path(path).resolve().parent
    return {source.file_name: folder / source.file_name for source in dataset.virtual_sources()}


def missing_sources(path, dataset: h5py.Dataset) -> list[str]:
    """The files a virtual ``dataset`` of the file at ``path`` reads that do not exist."""
    return sorted(name for name, file in virtual_sources(path, dataset).items() if not file.is_file())


class ShardWriter:
    """Writes rows at their positions; wrap in ``atomic_output`` so only a closed, complete file lands."""

    def __init__(self, path, ids, lengths, spec: OutputSpec, dim: int, dtype: str, attrs: dict, residue_runs=None):
        self._h5 = h5py.File(path, "w")
        self._datasets = create_outputs(self._h5, spec, ids, lengths, dim, DTYPES[dtype], residue_runs=residue_runs)
        self._embedded = spec.embedded_lengths(lengths)
        self._offsets = residue_offsets(self._embedded)
        self._written = np.zeros(len(ids), bool)
        write_attrs(self._h5, {**attrs, **spec.attrs(), "dtype": dtype, "versions": package_versions()})

    def write(self, positions: np.ndarray, outputs: dict[str, np.ndarray]) -> None:
        """``outputs`` hold rows in the order of ``positions``: one per sequence, or each
        sequence's per-residue rows one after another."""
        order, residue_order = sorted_rows(positions, self._embedded[positions])  # h5py writes in order only
        sorted_positions = positions[order]
        for name, values in outputs.items():
            dataset = self._datasets[name]
            if pooling_of(name) != "per_residue":
                dataset[sorted_positions] = values[order].astype(dataset.dtype)
                continue
            values = values[residue_order].astype(dataset.dtype)
            done = 0
            for first, end in runs(sorted_positions):  # consecutive sequences have consecutive rows
                start, stop = self._offsets[sorted_positions[first]], self._offsets[sorted_positions[end - 1] + 1]
                dataset[start:stop] = values[done : done + stop - start]
                done += stop - start
        self._written[positions] = True

    @property
    def names(self) -> list[str]:
        """The output datasets written through ``write`` (not the virtual ones)."""
        return list(self._datasets)

    def close(self) -> None:
        """Close the file; raises if any row was never written."""
        self._h5.close()
        missing = int((~self._written).sum())
        if missing:
            raise RuntimeError(f"shard incomplete: {missing} rows were never written")


def read_attrs(path) -> dict:
    with h5py.File(path, "r") as h5:
        return {key: plain_attr(value) for key, value in h5.attrs.items()}


def write_failure_shard(path, rank: int, error: str) -> None:
    """A shard that records why rank ``rank`` failed, in place of its embeddings."""
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as h5:
        write_attrs(h5, {"failed": True, "rank": rank, "error": error})


def shard_failure(path) -> str | None:
    """The error a failure shard at ``path`` records; None for any other file (or none)."""
    try:
        attrs = read_attrs(path)
    except Exception:  # a missing or damaged shard is not a failure shard; its checks say what it is
        return None
    return attrs.get("error", "unknown error") if attrs.get("failed") else None


def shard_problem(path, ids: np.ndarray, expected: dict, shapes: dict | None = None) -> str | None:
    """None when ``path`` is a whole, readable shard of exactly ``ids`` (in order) whose attributes
    include ``expected`` and whose datasets have ``shapes``; otherwise what is wrong, as the end
    of a sentence about the shard."""
    if not Path(path).is_file():
        return "does not exist"
    try:
        with h5py.File(path, "r") as h5:
            attrs = {key: plain_attr(h5.attrs.get(key)) for key in expected}
            stored = h5["ids"].asstr()[:]
            found = {name: h5[name].shape for name in (shapes or {}) if name in h5}
            gone = sorted({file for name in found for file in missing_sources(path, h5[name])})
            for name in found:
                h5[name][-1:]  # the last rows must be readable too
    except Exception as error:  # a torn or corrupt file raises many kinds
        return f"is unreadable ({' '.join(str(error).split())[:200]})"
    if gone:
        return f"refers to {len(gone)} store segment(s) that no longer exist (e.g. {gone[0]})"
    differ = [key for key in expected if attrs[key] != expected[key]]
    if differ:
        return f"was made with other settings ({', '.join(differ)})"
    for name, shape in (shapes or {}).items():
        if found.get(name) != tuple(shape):
            return f"has {name} of shape {found.get(name)}, not {tuple(shape)}"
    if len(stored) != len(ids) or not np.array_equal(stored, ids):
        lost, extra = len(set(ids) - set(stored)), len(set(stored) - set(ids))
        return f"does not hold exactly the planned IDs ({lost} missing, {extra} extra, or out of order)"
    return None


def write_attrs(h5: h5py.File, attrs: dict) -> None:
    """Attributes from plain values; lists of strings become HDF5 string arrays."""
    for key, value in attrs.items():
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            value = np.array(value, dtype=h5py.string_dtype())
        h5.attrs[key] = value


def plain_attr(value):
    """An HDF5 attribute as a plain Python value (numpy scalars, arrays and bytes converted)."""
    if isinstance(value, np.ndarray):
        return [plain_attr(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    return value
