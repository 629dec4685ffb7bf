"""Reading embeddings back: by ID, reading only the rows asked for, and exporting them."""

from pathlib import Path

import h5py
import numpy as np


def load_embeddings(path, ids=None) -> tuple[list[str], np.ndarray]:
    """(IDs, [n, dim] vectors) from an esmshard ``embeddings.h5`` or shard.

    With ``ids``, only those rows are read from disk, in the order asked; an unknown ID raises
    KeyError naming it. Without, everything is read.
    """
    with h5py.File(path, "r") as h5:
        stored = h5["ids"].asstr()[:]
        if ids is None:
            return list(stored), h5["embeddings"][:]
        ids = list(ids)
        order = np.argsort(stored)
        found = np.searchsorted(stored[order], ids)
        found = np.minimum(found, len(stored) - 1)
        rows = order[found]
        unknown = [i for i, row in zip(ids, rows) if stored[row] != i]
        if unknown:
            raise KeyError(f"{path}: {len(unknown)} ID(s) not found, e.g. {unknown[:3]}")
        unique_rows, inverse = np.unique(rows, return_inverse=True)  # h5py reads increasing rows
        return ids, h5["embeddings"][unique_rows][inverse]


def export_npy(path, out_dir) -> tuple[Path, Path]:
    """``embeddings.npy`` ([n, dim]) and ``ids.txt`` (one per line, same order) in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids, vectors = load_embeddings(path)
    np.save(out_dir / "embeddings.npy", vectors)
    (out_dir / "ids.txt").write_text("".join(f"{i}\n" for i in ids))
    return out_dir / "embeddings.npy", out_dir / "ids.txt"


def export_pt(path, out_dir) -> int:
    """One ``<id>.pt`` per sequence as fair-esm's extract.py writes with ``--include mean``:
    ``{"label": id, "mean_representations": {layer: tensor}}`` ('/' in an ID becomes '%2F')."""
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "r") as h5:
        layer = int(h5.attrs["layer"])
        ids = h5["ids"].asstr()[:]
        for start in range(0, len(ids), 4096):
            block = h5["embeddings"][start : start + 4096]
            for seq_id, vector in zip(ids[start : start + 4096], block):
                result = {"label": seq_id, "mean_representations": {layer: torch.from_numpy(vector.astype(np.float32))}}
                torch.save(result, out_dir / f"{seq_id.replace('/', '%2F')}.pt")
    return len(ids)
