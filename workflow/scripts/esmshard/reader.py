"""Reading embeddings back: by ID, reading only the rows asked for, and exporting them."""

import contextlib
import hashlib
import re
from collections import Counter
from pathlib import Path

import h5py
import numpy as np

from esmshard import EsmShardError
from esmshard.files import atomic_output
from esmshard.outputs import OutputSpec, dataset_name, pooling_of, resolve_layer
from esmshard.shard import missing_sources

_SAFE = "A-Za-z0-9_.|:+=@,-"  # characters that go into a .pt file's name as they are (no '~')
# What OutputSpec.from_attrs reads.
_SPEC_ATTRS = ("layers", "pooling", "num_layers", "long_sequences", "window_overlap")  # and max_residues where recorded
_EXPORT_ROWS = 4096  # proteins read at a time by export_per_id and export_tsv


def load_embeddings(path, ids=None, pooling: str = "mean", layer: int | None = None):
    """(IDs, vectors) from an esmshard ``embeddings.h5`` or shard.

    ``pooling`` and ``layer`` pick the output (``layer`` may be left out when the file holds one
    layer). Pooled outputs come as one [n, dim] array; ``per_residue`` as a list of [length, dim]
    arrays. With ``ids`` (one ID, or a list, tuple or array of them), only those rows are read
    from disk, in the order asked; an unknown ID raises KeyError naming it. Without, everything
    is read. A missing file raises FileNotFoundError; a file that is not esmshard's, or that refers
    to store segments that no longer exist, EsmShardError.
    """
    if isinstance(ids, str):  # one ID, not a sequence of one-character IDs
        ids = [ids]
    with _open_embeddings(path) as (h5, spec):
        name = _output_name(spec, pooling, layer, path)
        stored = h5["ids"].asstr()[:]
        rows = np.arange(len(stored)) if ids is None else _rows_of(stored, list(ids), path)
        found = [str(i) for i in stored[rows]]
        if pooling_of(name) != "per_residue":
            unique_rows, inverse = np.unique(rows, return_inverse=True)  # h5py reads increasing rows
            return found, h5[name][unique_rows][inverse] if len(rows) else np.empty((0, h5[name].shape[1]))
        offsets, dataset = h5["residue_offsets"][:], h5[name]
        if ids is None:
            everything = dataset[:]
            return found, [everything[offsets[r] : offsets[r + 1]] for r in rows]
        return found, [dataset[offsets[r] : offsets[r + 1]] for r in rows]


@contextlib.contextmanager
def _open_embeddings(path):
    """(open file, its OutputSpec); a one-line error naming the file unless it is an esmshard
    ``embeddings.h5`` or shard whose rows are all there (a shard's per-residue datasets refer to
    store segments)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if not h5py.is_hdf5(path):
        raise EsmShardError(f"{path} is not an HDF5 file, so not esmshard embeddings")
    with h5py.File(path, "r") as h5:
        lacking = [f"attribute {name!r}" for name in _SPEC_ATTRS if name not in h5.attrs]
        if not lacking:
            spec = OutputSpec.from_attrs(h5.attrs)
            datasets = ["ids", *spec.names] + (["residue_offsets"] if spec.per_residue else [])
            lacking = [f"dataset {name!r}" for name in datasets if name not in h5]
        if lacking:
            raise EsmShardError(f"{path} is not esmshard embeddings: it has no {', '.join(lacking)}")
        gone = sorted({name for output in spec.names for name in missing_sources(path, h5[output])})
        if gone:  # HDF5 would read their rows as NaN
            raise EsmShardError(
                f"{path} refers to {len(gone)} store segment(s) that no longer exist ({', '.join(gone[:3])}"
                f"{', ...' if len(gone) > 3 else ''}): run snakemake again, which computes their sequences again"
            )
        yield h5, spec


def _output_dir(out_dir) -> Path:
    """out_dir, made if need be (only once the input was found good: a failed export leaves no
    empty directory)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def _output_name(spec: OutputSpec, pooling: str, layer, path) -> str:
    if pooling not in spec.poolings:
        raise KeyError(f"{path} holds no {pooling!r} output (it holds {', '.join(spec.poolings)})")
    if layer is None:
        if len(spec.layers) > 1:
            raise KeyError(f"{path} holds layers {list(spec.layers)}: say which one")
        layer = spec.layers[0]
    try:
        layer = resolve_layer(layer, spec.num_layers)  # negative: counted from the end, as in the config
    except ValueError as error:
        raise KeyError(f"{path}: {error}") from None
    if layer not in spec.layers:
        raise KeyError(f"{path} holds no layer {layer} (it holds {list(spec.layers)})")
    return dataset_name(pooling, layer)


def _rows_of(stored: np.ndarray, ids: list, path) -> np.ndarray:
    order = np.argsort(stored)
    found = np.minimum(np.searchsorted(stored[order], ids), max(len(stored) - 1, 0))
    rows = order[found]
    unknown = [i for i, row in zip(ids, rows) if len(stored) == 0 or stored[row] != i]
    if unknown:
        raise KeyError(f"{path}: {len(unknown)} ID(s) not found, e.g. {unknown[:3]}")
    return rows


def export_npy(path, out_dir) -> list[Path]:
    """Every output as ``<pooling>_layer_<L>.npy`` ([n, dim]; per-residue outputs [residues, dim]
    with ``residue_offsets.npy``), and ``ids.txt`` (one per line, same order), in out_dir.

    Each file appears whole or not at all. Errors as load_embeddings, and NotADirectoryError for
    an out_dir that is a file."""
    written = []
    with _open_embeddings(path) as (h5, spec):
        out_dir = _output_dir(out_dir)
        for name in spec.names + (["residue_offsets"] if spec.per_residue else []):
            written.append(out_dir / f"{name.replace('/', '_')}.npy")
            with atomic_output(written[-1]) as tmp, open(tmp, "wb") as handle:  # np.save(path) adds .npy
                np.save(handle, h5[name][:])
        ids = h5["ids"].asstr()[:]
    with atomic_output(out_dir / "ids.txt") as tmp:
        tmp.write_text("".join(f"{i}\n" for i in ids))
    return [*written, out_dir / "ids.txt"]


def export_per_id(path, out_path, pooling: str = "mean", layer: int | None = None) -> int:
    """One dataset per protein in the HDF5 file ``out_path``, named by its ID: the layout
    ProtSpace, EAT, prott5_embedder and bio_embeddings read (``{k: f[k][()] for k in f}``). Pooled
    outputs are [dim], per-residue ones [length, dim]; ``layer`` defaults to the last the file
    holds. A '/' in an ID (HDF5's path separator) becomes '_'; each dataset's ``original_id``
    attribute holds the ID as it is, and the file's attributes the model, layer and pooling.
    Returns the number of proteins; the file appears whole or not at all. Errors as
    load_embeddings, and ValueError for two IDs that would share a name."""
    with _open_embeddings(path) as (h5, spec):
        name = _output_name(spec, pooling, max(spec.layers) if layer is None else layer, path)
        ids = h5["ids"].asstr()[:].tolist()
        keys = [seq_id.replace("/", "_") for seq_id in ids]
        shared = [key for key, count in Counter(keys).items() if count > 1 or key in (".", "")]
        if shared:
            clash = [seq_id for seq_id, key in zip(ids, keys) if key == shared[0]]
            raise ValueError(f"{path}: the IDs {clash} would share the dataset name {shared[0]!r} in {out_path}")
        offsets = h5["residue_offsets"][:] if pooling == "per_residue" else None
        source, out_path = h5[name], Path(out_path)
        with atomic_output(out_path) as tmp, h5py.File(tmp, "w") as out:
            out.attrs.update(
                {"model": h5.attrs.get("model", ""), "layer": int(name.rsplit("_", 1)[1]), "pooling": pooling}
            )
            for start in range(0, len(ids), _EXPORT_ROWS):
                end = min(start + _EXPORT_ROWS, len(ids))
                if offsets is None:
                    block, cuts = source[start:end], np.arange(end - start + 1)
                else:
                    block, cuts = source[offsets[start] : offsets[end]], offsets[start : end + 1] - offsets[start]
                for row in range(end - start):
                    values = block[cuts[row] : cuts[row + 1]]
                    dataset = out.create_dataset(keys[start + row], data=values if offsets is not None else values[0])
                    dataset.attrs["original_id"] = ids[start + row]
    return len(ids)


def export_tsv(path, out_path, pooling: str = "mean", layer: int | None = None) -> int:
    """A table for dataframe users in ``out_path``: a header ``id  0  1 ... dim-1``, then one row
    per protein in the file's order, its ID and its pooled vector (``layer`` defaults to the last
    the file holds), each value with the 9 significant digits that give a float32 back exactly.
    ``pandas.read_csv(out_path, sep="\t", index_col="id", keep_default_na=False)`` reads it (an
    ID such as "NA" stays a string). Per-residue output has no one row per protein: ValueError,
    as for a file without the output. Returns the number of proteins; the file appears whole or
    not at all."""
    if pooling == "per_residue":
        raise ValueError("per-residue output has no one row per protein: export it with --format per-id")
    with _open_embeddings(path) as (h5, spec):
        name = _output_name(spec, pooling, max(spec.layers) if layer is None else layer, path)
        ids = h5["ids"].asstr()[:].tolist()
        source = h5[name]
        with atomic_output(Path(out_path)) as tmp, open(tmp, "w") as out:
            out.write("\t".join(["id", *map(str, range(source.shape[1]))]) + "\n")
            for start in range(0, len(ids), _EXPORT_ROWS):
                block = source[start : start + _EXPORT_ROWS].astype(np.float32)
                for seq_id, row in zip(ids[start : start + _EXPORT_ROWS], block):
                    out.write(seq_id + "\t" + "\t".join(f"{value:.9g}" for value in row.tolist()) + "\n")
    return len(ids)


def export_pt(path, out_dir) -> int:
    """One ``.pt`` file per sequence as fair-esm's extract.py writes them: ``{"label": id,
    "mean_representations": {layer: [dim]}, "bos_representations": {layer: [dim]},
    "representations": {layer: [length, dim]}}`` with the outputs the file holds. Files are named
    by pt_file_name; ``ids.tsv`` maps each ID to its file (ID, tab, file name; file order), and is
    written last. Each file appears whole or not at all. Errors as export_npy."""
    import torch

    with _open_embeddings(path) as (h5, spec):
        ids = h5["ids"].asstr()[:].tolist()
        names = _pt_file_names(ids, path)
        out_dir = _output_dir(out_dir)
        for name, record in zip(names, _pt_records(h5, spec, ids)):
            with atomic_output(out_dir / name) as tmp:
                torch.save(record, tmp)
    with atomic_output(out_dir / "ids.tsv") as tmp:
        tmp.write_text("".join(f"{seq_id}\t{name}\n" for seq_id, name in zip(ids, names)))
    return len(ids)


def pt_file_name(seq_id: str) -> str:
    """``<ID>.pt`` (extract.py's name) for an ID of at most 200 of the characters ``_SAFE``, not
    starting with '.'; otherwise ``<prefix>~<hash>.pt``: the ID's first 64 characters with
    every other character as '_', and 16 hex digits of the SHA-256 of the whole ID. A plain name
    has no '~', so two IDs share a name only if their hashes do; no name is over 255 bytes."""
    if len(seq_id) <= 200 and re.fullmatch(f"[{_SAFE}]+", seq_id) and not seq_id.startswith("."):
        return f"{seq_id}.pt"
    prefix = re.sub(f"[^{_SAFE}]", "_", seq_id[:64]).lstrip(".")  # no hidden files
    return f"{prefix}~{hashlib.sha256(seq_id.encode()).hexdigest()[:16]}.pt"


def _pt_file_names(ids: list[str], path) -> list[str]:
    names = [pt_file_name(seq_id) for seq_id in ids]
    counts = Counter(names)
    shared = [seq_id for seq_id, name in zip(ids, names) if counts[name] > 1]
    if shared:  # an ID held twice (the index forbids it), or a hash collision
        raise EsmShardError(f"{path}: IDs {shared[:3]} would share a .pt file")
    return names


def _pt_records(h5, spec: OutputSpec, ids: list[str]):
    """extract.py's dict of each sequence, in file order, reading 1024 sequences at a time."""
    import torch

    keys = {"mean": "mean_representations", "bos": "bos_representations", "per_residue": "representations"}
    offsets = h5["residue_offsets"][:] if spec.per_residue else None
    for start in range(0, len(ids), 1024):
        end = min(len(ids), start + 1024)
        blocks = {}
        for name in spec.names:
            if pooling_of(name) == "per_residue":
                blocks[name] = (h5[name][offsets[start] : offsets[end]], offsets[start])
            else:
                blocks[name] = (h5[name][start:end], None)
        for row in range(start, end):
            record = {"label": ids[row]}
            for pooling in spec.poolings:
                record[keys[pooling]] = {}
                for layer in spec.layers:
                    values, base = blocks[dataset_name(pooling, layer)]
                    if base is None:
                        vector = values[row - start]
                    else:
                        vector = values[offsets[row] - base : offsets[row + 1] - base]
                    record[keys[pooling]][layer] = torch.from_numpy(vector.astype(np.float32))
            yield record
