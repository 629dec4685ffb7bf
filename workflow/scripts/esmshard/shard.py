"""Shard files: one rank's embeddings, in the rank's share of input order.

Layout (HDF5):
- ``ids``: [n] UTF-8 strings
- ``embeddings``: [n, dim] float32 (or float16, config ``dtype``)
- ``lengths``: [n] int64 residue counts of the input sequences (before any truncation)
- ``truncated``: [n] bool, true where the sequence was cut to 1022 residues
- attributes: model, layer, pooling, dtype, precision, engine, fingerprint (of the index), rank,
  world_size, versions (JSON of package versions)
"""

import json
import platform
from importlib import metadata

from pathlib import Path

import h5py
import numpy as np


ROW_DATASETS = ("ids", "embeddings", "lengths", "truncated")
DTYPES = {"float32": np.float32, "float16": np.float16}


def package_versions() -> str:
    versions = {"python": platform.python_version()}
    for package in ("esmshard", "torch", "fair-esm", "h5py", "numpy", "snakemake"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return json.dumps(versions, sort_keys=True)


class ShardWriter:
    """Writes rows at their positions; wrap in ``atomic_output`` so only a closed, complete file lands."""

    def __init__(self, path, ids, lengths, dim: int, dtype: str, attrs: dict):
        self._h5 = h5py.File(path, "w")
        n = len(ids)
        self._h5.create_dataset("ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype())
        self._h5.create_dataset("lengths", data=np.asarray(lengths, np.int64))
        self._truncated = self._h5.create_dataset("truncated", (n,), bool)
        self._embeddings = self._h5.create_dataset(
            "embeddings", (n, dim), DTYPES[dtype], chunks=(max(1, min(n, 1024)), dim)
        )
        self._written = np.zeros(n, bool)
        self._h5.attrs.update({**attrs, "dtype": dtype, "versions": package_versions()})

    def write(self, positions: np.ndarray, vectors: np.ndarray, truncated: np.ndarray) -> None:
        order = np.argsort(positions)  # h5py writes rows at increasing positions only
        positions = positions[order]
        self._embeddings[positions] = vectors[order].astype(self._embeddings.dtype)
        self._truncated[positions] = truncated[order]
        self._written[positions] = True

    def close(self) -> None:
        """Close the file; raises if any row was never written."""
        self._h5.close()
        missing = int((~self._written).sum())
        if missing:
            raise RuntimeError(f"shard incomplete: {missing} rows were never written")


def read_attrs(path) -> dict:
    with h5py.File(path, "r") as h5:
        return {key: plain_attr(value) for key, value in h5.attrs.items()}


def shard_problem(path, ids: np.ndarray, expected: dict, dim: int | None = None) -> str | None:
    """None when ``path`` is a whole, readable shard of exactly ``ids`` (in order) whose attributes
    include ``expected``; otherwise what is wrong, as the end of a sentence about the shard."""
    if not Path(path).is_file():
        return "does not exist"
    try:
        with h5py.File(path, "r") as h5:
            attrs = {key: plain_attr(h5.attrs.get(key)) for key in expected}
            stored = h5["ids"].asstr()[:]
            shape = h5["embeddings"].shape
            h5["embeddings"][-1:]  # the last rows must be readable too
    except Exception as error:  # a torn or corrupt file raises many kinds
        return f"is unreadable ({' '.join(str(error).split())[:200]})"
    differ = [key for key in expected if attrs[key] != expected[key]]
    if differ:
        return f"was made with other settings ({', '.join(differ)})"
    if dim is not None and shape[1:] != (dim,):
        return f"has embeddings of width {shape[1:]}, not {dim}"
    if shape[0] != len(ids) or not np.array_equal(stored, ids):
        lost, extra = len(set(ids) - set(stored)), len(set(stored) - set(ids))
        return f"does not hold exactly the planned IDs ({lost} missing, {extra} extra, or out of order)"
    return None


def plain_attr(value):
    """An HDF5 attribute as a plain Python value (numpy scalars and bytes converted)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    return value
