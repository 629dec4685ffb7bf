"""Merging the shards of the ranks that succeeded into one file, in input order.

Every accepted shard is checked against the plan first (same index fingerprint, exactly the
planned IDs in order, same settings and width); the manifest says which ranks succeeded,
which failed and why, and which IDs are missing.
"""

import json
import logging
from pathlib import Path

import h5py
import numpy as np

from esmshard import EsmShardError, atomic_output
from esmshard.index import SequenceIndex
from esmshard.plan import read_plan
from esmshard.rank import new_token, read_status
from esmshard.outputs import OutputSpec, pooling_of, ranges_index, residue_offsets
from esmshard.shard import create_outputs, dataset_shapes, read_attrs, shard_problem, write_attrs

log = logging.getLogger(__name__)

# Attributes every shard of one run must share; they are copied to the merged file.
SHARED_ATTRS = ("model", "num_layers", "layers", "pooling", "long_sequences", "window_overlap", "precision", "dtype", "engine",
                "fingerprint", "world_size", "max_residues")
_BLOCK_ROWS = 16384  # sequences copied at a time ...
_BLOCK_RESIDUES = 65536  # ... and per-residue rows (a block of 1280-wide float32 rows is 335 MB)


def aggregate(index_dir, plan_path, status_paths, token_paths, out_path, manifest_path, missing_path,
              require_complete=False) -> dict:
    """Merge the shards of the ranks whose status says they succeeded.

    A shard that turns out damaged (unreadable, or not exactly its planned IDs and settings)
    counts as a failed rank, and its token (``token_paths``) changes so that the next run of
    the workflow recomputes it.
    """
    index = SequenceIndex(index_dir)
    planned_rank, world_size, fingerprint = read_plan(plan_path)
    if len(status_paths) != world_size:
        raise EsmShardError(f"{len(status_paths)} rank status files for a plan of {world_size} ranks")
    statuses = [read_status(path) for path in status_paths]
    failed = {r: status.get("error", "unknown error") for r, status in enumerate(statuses) if not status["ok"]}
    all_ids = index.ids()
    shards = {r: Path(status["shard"]) for r, status in enumerate(statuses) if status["ok"]}
    attrs, damaged = _check_shards(shards, planned_rank, all_ids, index.lengths, fingerprint, world_size)
    for rank, problem in damaged.items():
        log.warning("rank %d: %s; it counts as failed and the next run recomputes it", rank, problem)
        new_token(token_paths[rank])
        failed[rank] = problem
        del shards[rank]
    ok_ranks = sorted(shards)

    missing = {r: all_ids[planned_rank == r].tolist() for r in sorted(failed)}
    n_missing = sum(len(ids) for ids in missing.values())
    if not ok_ranks:
        details = "; ".join(f"rank {r}: {error}" for r, error in sorted(failed.items()))
        raise EsmShardError(f"no rank succeeded, so there are no embeddings ({details}); see the rank logs")
    if failed and require_complete:
        raise EsmShardError(
            f"require_complete is set and rank(s) {_list(failed)} failed ({n_missing} sequences missing); "
            f"rerun snakemake to retry them"
        )

    keep = np.isin(planned_rank, ok_ranks)
    with atomic_output(out_path) as tmp:
        _merge(tmp, shards, planned_rank, keep, all_ids, index.lengths, attrs)
        with h5py.File(tmp, "a") as h5:
            h5.attrs["ranks_succeeded"] = np.array(ok_ranks, dtype=np.int64)
            h5.attrs["ranks_failed"] = np.array(sorted(failed), dtype=np.int64)
            h5.attrs["n_missing"] = n_missing

    manifest = {
        "complete": not failed,
        "output": str(out_path),
        "fingerprint": fingerprint,
        "world_size": world_size,
        "sequences": len(all_ids),
        "embedded": int(keep.sum()),
        "missing": n_missing,
        "missing_ids_file": str(missing_path),
        "ranks_succeeded": ok_ranks,
        "ranks_failed": [{"rank": r, "error": failed[r], "missing_ids": missing[r]} for r in sorted(failed)],
    }
    with atomic_output(missing_path) as tmp:
        Path(tmp).write_text("".join(f"{i}\n" for r in sorted(missing) for i in missing[r]))
    with atomic_output(manifest_path) as tmp:
        Path(tmp).write_text(json.dumps(manifest, indent=2) + "\n")
    if failed:
        log.warning(
            "rank(s) %s failed: %d of %d sequences are missing from %s (IDs in %s). "
            "Rerun snakemake to retry only the failed ranks.",
            _list(failed), n_missing, len(all_ids), out_path, missing_path,
        )
    return manifest


def _list(ranks) -> str:
    return ", ".join(str(r) for r in sorted(ranks))


def _check_shards(shards: dict, planned_rank, all_ids, all_lengths, fingerprint: str, world_size: int):
    """(attributes the good shards share, with their width; {rank: problem} for damaged shards)."""
    shared, versions = None, None
    damaged = {}
    for rank, path in shards.items():
        planned = planned_rank == rank
        expected = {"fingerprint": fingerprint, "rank": rank, "world_size": world_size}
        problem = shard_problem(path, all_ids[planned], expected)
        if not problem:
            attrs = read_attrs(path)
            spec = OutputSpec.from_attrs(attrs)
            with h5py.File(path, "r") as h5:
                width = h5[spec.names[0]].shape[1] if spec.names[0] in h5 else 0
            problem = shard_problem(path, all_ids[planned], {}, dataset_shapes(spec, all_lengths[planned], width))
        if problem:
            damaged[rank] = f"shard {path} {problem}"
            continue
        these = {**{key: attrs.get(key) for key in SHARED_ATTRS}, "width": width}
        if shared is not None and these != shared:
            differ = [key for key in these if these[key] != shared[key]]
            raise EsmShardError(
                f"shard {path} was made with other settings ({', '.join(differ)}) than the other shards; "
                f"delete results/status and rerun"
            )
        shared, versions = these, attrs.get("versions")
    return ({**shared, "versions": versions} if shared else None), damaged


def _merge(path, shards: dict, planned_rank, keep, all_ids, lengths, attrs: dict) -> None:
    """Write the kept sequences in input order, copying contiguous row ranges from each shard."""
    spec = OutputSpec.from_attrs(attrs)
    positions = np.flatnonzero(keep)
    row_in_shard = np.empty(len(planned_rank), np.int64)
    shard_offsets = {}  # rank -> its per-residue row offsets
    for rank in shards:
        members = np.flatnonzero(planned_rank == rank)
        row_in_shard[members] = np.arange(len(members))
        shard_offsets[rank] = residue_offsets(spec.embedded_lengths(lengths[members]))
    embedded = spec.embedded_lengths(lengths[positions])
    out_offsets = residue_offsets(embedded)
    sources = {rank: h5py.File(p, "r") for rank, p in shards.items()}
    try:
        dtype = np.dtype(attrs["dtype"])
        with h5py.File(path, "w") as out:
            datasets = create_outputs(out, spec, all_ids[positions], lengths[positions], attrs["width"], dtype)
            for start, end in _blocks(embedded if spec.per_residue else None, len(positions)):
                block = positions[start:end]
                block_rank = planned_rank[block]
                for name, dataset in datasets.items():
                    per_residue = pooling_of(name) == "per_residue"
                    out_start, out_end = (out_offsets[start], out_offsets[end]) if per_residue else (start, end)
                    values = np.empty((out_end - out_start, attrs["width"]), dtype)
                    for rank in np.unique(block_rank).tolist():
                        mine = np.flatnonzero(block_rank == rank)
                        rows = row_in_shard[block[mine]]  # consecutive rows of that shard
                        first, last = int(rows[0]), int(rows[-1]) + 1
                        if per_residue:
                            offsets = shard_offsets[rank]
                            source = sources[rank][name][offsets[first] : offsets[last]]
                            targets = ranges_index(out_offsets[start + mine] - out_start, embedded[start + mine])
                        else:
                            source, targets = sources[rank][name][first:last], mine
                        values[targets] = source
                    dataset[out_start:out_end] = values
            write_attrs(out, {key: value for key, value in attrs.items() if value is not None and key != "width"})
    finally:
        for source in sources.values():
            source.close()


def _blocks(embedded, n: int):
    """(start, end) blocks of sequences, at most _BLOCK_ROWS sequences and, with per-residue
    output, at most _BLOCK_RESIDUES residues (or one sequence, if longer)."""
    start = 0
    ends = np.cumsum(embedded) if embedded is not None else None
    while start < n:
        end = min(n, start + _BLOCK_ROWS)
        if ends is not None:
            before = ends[start - 1] if start else 0
            end = max(start + 1, min(end, int(np.searchsorted(ends, before + _BLOCK_RESIDUES, side="right"))))
        yield start, end
        start = end
